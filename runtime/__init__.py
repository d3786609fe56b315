"""What every stage needs from the process it runs in: the device choice (device.py), the launcher's
ranks and data_gen's gloo group (distributed.py), atomic file writes (files.py), and the run directory's
lock, thread count and safe folder replacement (rundir.py)."""
