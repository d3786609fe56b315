"""The whole configuration tree and its registration in Hydra's ConfigStore.

Typed dataclasses make a misspelt key fail with Hydra's own clear error (`Key 'x' not in 'TrainConfig'`).
`load_config(["stage=eval", ...])` composes the same tree without `@hydra.main`, for tests and notebooks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from conf.errors import DraftsmithError
from conf.schema.data import DataConfig
from conf.schema.drafter import DRAFTER_SCHEMAS
from conf.schema.drafter_pretrain import DrafterPretrainConfig
from conf.schema.eval import EvalConfig
from conf.schema.export import ExportConfig
from conf.schema.objective import OBJECTIVE_SCHEMAS
from conf.schema.plan import PlanConfig
from conf.schema.pretrain import PretrainConfig
from conf.schema.training import DeepSpeedConfig, TrainConfig

CONF_DIR = Path(__file__).resolve().parent.parent
PROJECT_ROOT = CONF_DIR.parent
STAGES = ("target_pretrain", "data_gen", "drafter_pretrain", "train", "eval", "export", "plan")


@dataclass
class RunConfig:
    name: str = "demo"  # run directory = <root>/<name>; later stages find their inputs there
    root: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto = cuda:<LOCAL_RANK> when a GPU is present, else cpu
    # torch CPU threads of every stage; None = torch's default (physical cores or OMP_NUM_THREADS) capped at 8.
    # Timed figures (eval's tok/s) depend on it: on a shared or small machine set it, e.g. run.threads=1.
    threads: Optional[int] = None


@dataclass
class TargetConfig:
    path: str = "assets/demo-target"  # local folder or hub id
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or float32 | bfloat16 | float16
    # Hidden states *entering* these decoder layers are tapped (the last layer's output is always
    # added). None = EAGLE-3's low/mid/high choice: [2, L//2, L-3].
    feature_layers: Optional[List[int]] = None
    chat_template: Optional[str] = None  # Jinja string or .jinja path, for tokenizers without one
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class Config:
    stage: Optional[str] = None  # run one stage against an existing run directory
    stages: List[str] = field(default_factory=lambda: ["data_gen", "train", "eval", "export"])
    run: RunConfig = field(default_factory=RunConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    drafter_pretrain: DrafterPretrainConfig = field(default_factory=DrafterPretrainConfig)  # FastDraft's first phase
    data: DataConfig = field(default_factory=DataConfig)
    drafter: Any = MISSING  # a conf.drafter.DrafterConfig subclass, chosen by drafter=<name>
    objective: Any = MISSING  # a conf.objective.ObjectiveConfig subclass
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # stage=plan and the train stage's preflight


def register() -> None:
    """Store the schemas. Groups typed by a field of `Config` are validated by it directly; drafter and
    objective options differ per family, so their YAMLs pull a schema with `- /schema/<group>/<name>@_here_`."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, node in DRAFTER_SCHEMAS.items():
        cs.store(group="schema/drafter", name=name, node=node)
    for name, node in OBJECTIVE_SCHEMAS.items():
        cs.store(group="schema/objective", name=name, node=node)


register()


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose conf/config.yaml with command-line style overrides and return typed objects."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_object(cfg)


def run_dir(cfg: Config) -> Path:
    """The run directory that every stage writes under and later stages read from."""
    return Path(cfg.run.root) / cfg.run.name


def final_drafter_dir(cfg: Config) -> Path:
    """Where the train stage writes the trained drafter folder (`<run>/train/final`)."""
    return run_dir(cfg) / "train" / "final"


def trained_drafter_dir(cfg: Config) -> Path:
    """The drafter folder eval and export read: drafter.checkpoint, else the run's final train folder;
    a one-line error when it is not there."""
    d = Path(project_path(cfg.drafter.checkpoint)) if cfg.drafter.checkpoint else final_drafter_dir(cfg)
    if not d.is_dir():
        raise DraftsmithError(f"no trained drafter at {d}: run stage=train first (it writes <run>/train/final) "
                              "or set drafter.checkpoint=<a drafter folder>")
    return d


def project_path(path: str) -> str:
    """Resolve a relative path against the working directory first, then the project root
    (so `assets/demo-target` works from anywhere)."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return str(p)
    alt = PROJECT_ROOT / p
    return str(alt) if alt.exists() else str(p)


def save_config(cfg: Config, stage_dir: Path | str) -> Path:
    """Keep the resolved config beside a stage's output (`<stage dir>/config.yaml`)."""
    from omegaconf import OmegaConf

    path = Path(stage_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path
