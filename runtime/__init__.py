"""What every stage needs from the process it runs in: the device choice (device.py) and the run
directory's lock, thread count and safe folder replacement (rundir.py)."""
