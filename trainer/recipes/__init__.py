"""Reference training recipes: a model, its data and a plain training loop, small enough to run anywhere.

Each recipe takes a learning-rate schedule callback and logging callbacks, so the same loop serves the
benchmarks (recorded curves), demos, and the worker client (which turns the callbacks into metric uploads
and the schedule into "apply the server's decisions").
"""
