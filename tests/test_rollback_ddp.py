"""A rollback reaches every rank of a DistributedDataParallel job at the same step and restores the same weights.

Two real processes on gloo (CPU) train a small model in DDP; rank 0 talks to the real server. An operator's
decay saves a stage checkpoint (rank 0 writes it); an operator's rollback to it is loaded by both ranks at the
same step boundary: parameters bit-identical to the checkpoint on each rank, the pre-decay LR back, and the job
trains on from the checkpoint's step to the end. The server holds each step once, the abandoned ones in the
audit log.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes
from torch.nn.parallel import DistributedDataParallel

import trainer
from server.app import create_app
from server.migrate import upgrade
from server.settings import Settings
from tests.conftest import LiveServer, make_run
from trainer.torch import CommandApplier

pytestmark = pytest.mark.slow

WORLD = 2
END = 120  # the job ends once it has trained up to this step after the rollback
LR0 = 0.1


def worker(rank: int, init_file: str, url: str, run_id: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)
        model = DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=LR0, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10_000, gamma=0.5)
        record: dict[str, Any] = {"lrs": {}}
        with contextlib.ExitStack() as stack:
            run = None
            if rank == 0:
                run = stack.enter_context(trainer.start_run(url, run_id=run_id, spool_dir=Path(out) / "spool"))
            applier = CommandApplier(run, optimizer, scheduler, model=model, checkpoint_dir=Path(out) / "ckpts")
            x, y = torch.randn(8, 4) + rank, torch.randn(8, 1)
            step, total, rolled_back = 0, 0, False
            # The same condition on both ranks (rewound_to is set on each): they leave the loop together.
            while (step < END or not rolled_back) and total < 20_000:
                step += 1
                total += 1
                lr = float(optimizer.param_groups[0]["lr"])
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                if run is not None:
                    run.log({"lr": lr, "after_rollback": float(rolled_back)}, step=step)
                applied = applier.step(step)
                if applier.rewound_to is not None:
                    (done,) = applied
                    assert done.action == "rollback"
                    path = Path(out) / "ckpts" / f"stage-end-step{applier.rewound_to}.pt"  # rank 0 wrote it
                    saved = torch.load(path, weights_only=False)
                    record["rollback"] = {
                        "at": step,
                        "to": applier.rewound_to,
                        "identical": all(torch.equal(t, saved["model"][k]) for k, t in model.state_dict().items()),
                        "momentum_identical": all(
                            torch.equal(b["momentum_buffer"], saved["optimizer"]["state"][i]["momentum_buffer"])
                            for i, b in optimizer.state_dict()["state"].items()
                        ),
                        "lr": applier.current_lr(),
                    }
                    step, rolled_back = applier.rewound_to, True
                record["lrs"][step] = applier.current_lr()
                if run is not None and step == 1 and total == 1:
                    (Path(out) / "started").touch()
                time.sleep(0.01)  # a training step's pace
            if run is not None:
                assert run.flush(timeout=20)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def wait_for(condition: Any, what: str, context: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not in time"
        assert all(p.is_alive() for p in context.processes), f"{what}: a worker died"
        time.sleep(0.05)


def test_rollback_reaches_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'stagewatch.db'}"
    upgrade(db_url)
    with (
        LiveServer(create_app(Settings(database_url=db_url, auth=False, heartbeat_grace_s=60))) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        run_id = make_run(client, name="ddp-rollback")
        context = start_processes(  # type: ignore[no-untyped-call]
            worker,
            args=(str(tmp_path / "init"), server.url, run_id, str(tmp_path)),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        wait_for(lambda: (tmp_path / "started").exists(), "start", context)
        decay = client.post(f"/api/v1/runs/{run_id}/commands", json={"action": "decay", "factor": 0.1})
        assert decay.status_code == 201, decay.text

        def checkpoints() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = client.get(f"/api/v1/runs/{run_id}/checkpoints").json()["data"]
            return found

        def stored_through() -> int:
            series = client.get(f"/api/v1/runs/{run_id}/metrics", params={"key": "lr"}).json()["series"]
            return int(series[0]["steps"][-1]) if series else 0

        wait_for(lambda: len(checkpoints()) == 1, "the stage checkpoint", context)
        (checkpoint,) = checkpoints()
        wait_for(lambda: stored_through() >= checkpoint["step"] + 10, "training after the decay", context)
        rollback = client.post(f"/api/v1/runs/{run_id}/rollback", json={"checkpoint_id": checkpoint["id"]})
        assert rollback.status_code == 201, rollback.text
        deadline = time.monotonic() + 90
        while not context.join(timeout=1):  # raises if a rank failed
            assert time.monotonic() < deadline, "the workers did not finish"

        records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
        assert records[0] == records[1]  # the same LR at every step, the same rollback, on both ranks
        done = records[0]["rollback"]
        at = checkpoint["step"]
        assert (done["to"], done["identical"], done["momentum_identical"], done["lr"]) == (at, True, True, LR0)
        assert done["at"] > at + 10

        lrs = client.get(f"/api/v1/runs/{run_id}/metrics", params={"key": "lr", "max_points": 10_000}).json()
        after = client.get(
            f"/api/v1/runs/{run_id}/metrics", params={"key": "after_rollback", "max_points": 10_000}
        ).json()
        (lr_series,) = lrs["series"]
        (flag_series,) = after["series"]
        assert lr_series["steps"] == list(range(1, END + 1))  # every step once
        # Up to the checkpoint the first pass's points, after it the second pass's, all at the pre-decay LR.
        assert set(lr_series["values"]) == {LR0}
        assert flag_series["values"] == [0.0] * at + [1.0] * (END - at)
        rewinds = client.get(f"/api/v1/runs/{run_id}/rewinds").json()["data"]
        assert [(r["step"], r["removed"]["lr"]) for r in rewinds] == [(at, done["at"] - at)]
        decisions = client.get(f"/api/v1/runs/{run_id}/decisions").json()
        assert [(d["action"], d["status"]) for d in decisions] == [("decay", "rolled_back"), ("rollback", "applied")]
