"""Speculative decoding: the draft-tree builder (tree.py), the verification rules (verify.py), the
static-cache fast path (kvcache.py) and the decoder that drives them (decoder.py). Eval measures with it,
export proves an exported drafter with it, on-policy training drafts with it."""
