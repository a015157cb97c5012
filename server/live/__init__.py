"""Live stage detection: detectors run on each run's stream as it arrives, their decisions go through the
run's mode, and stages follow the logged learning rate (see :mod:`server.live.detection`)."""
