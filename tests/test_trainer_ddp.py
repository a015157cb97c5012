"""A command reaches every rank of a DistributedDataParallel job at the same step, exactly once.

Two real processes on the gloo backend (CPU), a tiny model in DDP. The parent runs the real app; an operator
creates a decay command through REST while the job trains; rank 0 resumes the run and talks to the server,
rank 1 has no run. Each rank records the LR in effect at every step.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes
from torch.nn.parallel import DistributedDataParallel

import trainer
from server.app import create_app
from server.db import make_engine, make_session_factory, transaction
from server.migrate import upgrade
from server.models import Decision
from server.settings import Settings
from tests.conftest import LiveServer, make_run
from trainer.torch import CommandApplier

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

WORLD = 2
STEPS = 250
LR0 = 0.1


def worker(rank: int, init_file: str, url: str, run_id: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)
        model = DistributedDataParallel(torch.nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=LR0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10_000, gamma=0.5)
        with contextlib.ExitStack() as stack:
            run = None
            if rank == 0:
                run = stack.enter_context(trainer.start_run(url, run_id=run_id, spool_dir=Path(out) / "spool"))
            applier = CommandApplier(run, optimizer, scheduler)
            history: list[tuple[int, float]] = []
            x, y = torch.randn(8, 4), torch.randn(8, 1)
            for step in range(STEPS):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                applier.step(step)
                lr = float(optimizer.param_groups[0]["lr"])
                history.append((step, lr))
                if run is not None:
                    run.log({"lr": lr}, step=step)
                    if step == 0:
                        (Path(out) / "started").touch()
                time.sleep(0.01)
            if run is not None:
                assert run.flush(timeout=20)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(history))
    finally:
        dist.destroy_process_group()


def test_a_decay_reaches_both_ranks_at_the_same_step(tmp_path: Path):
    db_url = f"sqlite:///{tmp_path / 'stagewatch.db'}"
    upgrade(db_url)
    with (
        LiveServer(create_app(Settings(database_url=db_url, auth=False, heartbeat_grace_s=60))) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        run_id = make_run(client, name="ddp")
        context = start_processes(  # type: ignore[no-untyped-call]
            worker,
            args=(str(tmp_path / "init"), server.url, run_id, str(tmp_path)),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 45
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline, "the workers did not start"
            assert all(p.is_alive() for p in context.processes), "a worker died"
            time.sleep(0.05)
        time.sleep(0.3)  # well into training
        response = client.post(
            f"/api/v1/runs/{run_id}/commands", json={"action": "decay", "factor": 0.5, "reason": "ddp"}
        )
        assert response.status_code == 201, response.text
        command_id = response.json()["id"]
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the workers did not finish"
        histories = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
        assert histories[0] == histories[1]
        lrs = [lr for _, lr in histories[0]]
        changes = [s for s in range(1, STEPS) if lrs[s] != lrs[s - 1]]
        assert len(changes) == 1, changes
        (at,) = changes
        assert 0 < at < STEPS - 1
        assert set(lrs[:at]) == {LR0} and set(lrs[at:]) == {LR0 * 0.5}
    # The worker's acknowledgement is stored: applied at that step with that LR.
    engine = make_engine(db_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            command = session.get(Decision, command_id)
            assert command is not None
            assert (command.status, command.applied_step, command.applied_lr) == ("applied", at, LR0 * 0.5)
    finally:
        engine.dispose()
