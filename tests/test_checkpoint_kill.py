"""``kill -9`` right after a checkpoint loses none of the points the checkpoint covers.

A real (tiny) training job runs in a subprocess against the real server, logs every step and saves a checkpoint
at step ``K`` through each integration (the plain PyTorch hook, the Lightning callback, the Hugging Face callback).
Each integration calls ``Run.checkpoint()`` when the job saves a checkpoint. With ``batch_interval_s=30`` the
sender thread would not post the last steps for half a minute, so without that checkpoint they would still be in
memory only. Once the checkpoint has been written the job writes a marker file and blocks, still alive with
whatever it holds in memory; the test kills it with SIGKILL and reads back over REST which ``(key, step)`` pairs
the server stored.

One more PyTorch job checkpoints while the server is down: ``checkpoint()`` gives up and writes the points to
the spool; after the kill the server comes back on the same port and a resumed process that opens the same
spool directory with ``resume_step=K`` delivers them, and nothing after ``K``.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import trainer
from server.app import create_app
from server.settings import Settings
from tests.conftest import LiveServer, free_port

pytestmark = pytest.mark.slow  # see the tiers in the README (make test-fast leaves these out)

REPO = Path(__file__).resolve().parent.parent
K = 5  # the checkpoint step; every job has 8 batches per epoch, so K is mid-epoch: no epoch-end metrics by then
MARKER_TIMEOUT_S = 90.0  # imports of Lightning or transformers on a loaded 2-core machine; never a fixed sleep

# The start of every job: arguments, a marker written atomically (the test never reads half a file), and data.
PRELUDE = """
import json, os, sys, threading, time
import torch
import trainer

url, spool, out, K = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def mark(name, **info):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(out, name))

def block():
    threading.Event().wait()  # alive, with whatever is in memory, until kill -9

torch.manual_seed(0)
x = torch.randn(64, 4)
y = (x @ torch.tensor([1.0, -2.0, 0.5, 1.5]) > 0).long()  # 8 batches of 8
"""

PYTORCH_WORKER = (
    PRELUDE
    + """
from trainer.integrations.pytorch import StagewatchHook

with trainer.start_run(url, name="kill-pytorch", spool_dir=spool, batch_interval_s=30, command_wait_s=1) as run:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = StagewatchHook(run, optimizer, log_every=1)
    for i in range(K):
        xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        hook.record(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert hook.step == K
    sent_before = run.points_sent
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": hook.state_dict()}
    torch.save(state, os.path.join(out, "checkpoint.pt"))
    mark("checkpointed", run_id=run.id, step=hook.step, sent_before=sent_before)
    block()
"""
)

LIGHTNING_WORKER = (
    PRELUDE
    + """
import warnings
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from trainer.integrations.lightning import StagewatchCallback

warnings.filterwarnings("ignore")

class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        xb, yb = batch
        loss = torch.nn.functional.cross_entropy(self.layer(xb), yb)
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=len(xb))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class KillPoint(pl.Callback):
    sent_before = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # After the Stagewatch callback logged lr at K, before ModelCheckpoint (Lightning runs it last) saves.
        if trainer.global_step == K:
            self.sent_before = run.points_sent

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Step K is over: its checkpoint is on disk and Lightning has handed its step metrics to the loggers.
        # Step K + 1 has not started: nothing was trained after the checkpoint.
        if trainer.global_step == K:
            mark("checkpointed", run_id=run.id, step=trainer.global_step, sent_before=self.sent_before)
            block()

with trainer.start_run(url, name="kill-lightning", spool_dir=spool, batch_interval_s=30, command_wait_s=1) as run:
    fit = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[
            StagewatchCallback(run),
            KillPoint(),
            ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=K, save_top_k=-1),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    fit.fit(Classifier(), DataLoader(TensorDataset(x, y), batch_size=8))
"""
)

HUGGINGFACE_WORKER = (
    PRELUDE
    + """
from transformers import Trainer, TrainerCallback, TrainingArguments
from trainer.integrations.huggingface import StagewatchCallback

class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return len(x)

    def __getitem__(self, index):
        return {"x": x[index], "labels": y[index]}

class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.layer(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

class KillPoint(TrainerCallback):
    sent_before = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == K:  # after the Stagewatch callback queued step K's log, before the save
            self.sent_before = run.points_sent

    def on_save(self, args, state, control, **kwargs):
        # The Trainer calls on_save once checkpoint-K is written; the Stagewatch callback's on_save ran first.
        if state.global_step == K:
            mark("checkpointed", run_id=run.id, step=state.global_step, sent_before=self.sent_before)
            block()

with trainer.start_run(url, name="kill-huggingface", spool_dir=spool, batch_interval_s=30, command_wait_s=1) as run:
    args = TrainingArguments(
        output_dir=os.path.join(out, "hf"),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        num_train_epochs=1,
        per_device_train_batch_size=8,
        learning_rate=0.1,
        optim="sgd",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=K,
        dataloader_num_workers=0,
    )
    callbacks = [StagewatchCallback(run), KillPoint()]
    Trainer(model=TinyClassifier(), args=args, train_dataset=Pairs(), callbacks=callbacks).train()
"""
)

# The server is up for steps 1..DELIVERED (flushed), then down: the checkpoint at K goes to the spool. The job goes
# on to K + AFTER and is killed while saving its next checkpoint: hook.state_dict() ran (so those points are in
# the spool too) but torch.save never finished, so the job resumes from K and the spool's steps after K must go.
DOWN_WORKER = (
    PRELUDE
    + """
from trainer.integrations.pytorch import StagewatchHook

delivered, after = int(sys.argv[5]), int(sys.argv[6])
options = dict(batch_interval_s=30, retry_max_s=0.2, timeout=2, command_wait_s=1)
with trainer.start_run(url, name="kill-down", spool_dir=spool, **options) as run:
    checkpoint, results = run.checkpoint, []

    def recorded_checkpoint(timeout=5.0):  # what the hook's checkpoint() calls return
        results.append(checkpoint(timeout))
        return results[-1]

    run.checkpoint = recorded_checkpoint
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = StagewatchHook(run, optimizer, log_every=1)
    for i in range(K + after):
        xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        hook.record(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if hook.step == delivered:
            assert run.flush(timeout=30)
            mark("delivered", run_id=run.id)
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(out, "server-down")):
                assert time.monotonic() < deadline, "the test never stopped the server"
                time.sleep(0.02)
        if hook.step == K:
            torch.save({"model": model.state_dict(), "hook": hook.state_dict()}, os.path.join(out, "checkpoint.pt"))
    hook.state_dict()  # the checkpoint at K + after, killed before its torch.save
    mark("killed-here", run_id=run.id, step=hook.step, checkpoints=results)
    block()
"""
)


# --- helpers --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def job(script: str, tmp_path: Path, *args: object) -> Iterator[subprocess.Popen[bytes]]:
    """The script in a subprocess (url, spool, out, K and ``args`` as arguments); killed when the block ends."""
    out = tmp_path / "out"
    out.mkdir()
    log_path = tmp_path / "job.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def wait_for_marker(path: Path, proc: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    """The JSON the job wrote at ``path``, once it is there; fails at once if the job died first."""
    deadline = time.monotonic() + MARKER_TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before {path.name}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path.name} after {MARKER_TIMEOUT_S}s:\n{log_tail(log_path)}")
        time.sleep(0.02)
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:]


def kill9(proc: subprocess.Popen[bytes]) -> None:
    assert proc.poll() is None, "the job must still be alive, points in memory, when it is killed"
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL


def stored_steps(url: str, run_id: int) -> dict[str, list[int]]:
    """Every stored point of the run, as key -> steps in export order (a point stored twice shows twice)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.get(f"/api/v1/runs/{run_id}/metrics/export", params={"format": "csv"})
    assert response.status_code == 200, response.text
    steps: dict[str, list[int]] = collections.defaultdict(list)
    for row in csv.DictReader(io.StringIO(response.text)):
        steps[row["key"]].append(int(row["step"]))
    return {key: sorted(s) for key, s in steps.items()}


def assert_stored_exactly(url: str, run_id: int, expected: dict[str, int]) -> None:
    """``expected``: key -> number of steps; each key must be stored at steps 1..n, once each, and nothing else."""
    stored = stored_steps(url, run_id)
    assert {key: len(steps) for key, steps in stored.items()} == expected
    assert stored == {key: list(range(1, n + 1)) for key, n in expected.items()}


def run_killed_job(script: str, server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    """Runs ``script`` until it blocks after its checkpoint at K, kills it with SIGKILL; returns its marker."""
    with job(script, tmp_path, server.url, tmp_path / "spool", tmp_path / "out", K) as proc:
        marker = wait_for_marker(tmp_path / "out" / "checkpointed", proc, tmp_path / "job.log")
        kill9(proc)
    assert marker["step"] == K and isinstance(marker["run_id"], int)
    return marker


# --- the server is up at checkpoint time ------------------------------------------------------------------------


def test_pytorch_hook_kill_after_checkpoint_loses_nothing(server: LiveServer, tmp_path: Path) -> None:
    marker = run_killed_job(PYTORCH_WORKER, server, tmp_path)
    assert (tmp_path / "out" / "checkpoint.pt").is_file()
    # Not vacuous: before the checkpoint the server had not stored all K steps (batch_interval_s=30).
    assert marker["sent_before"] < 2 * K
    # The hook logs lr and the recorded loss at every step (log_every=1): steps 1..K, once each.
    assert_stored_exactly(server.url, marker["run_id"], {"lr": K, "loss": K})


def test_lightning_callback_kill_after_checkpoint_loses_nothing(server: LiveServer, tmp_path: Path) -> None:
    marker = run_killed_job(LIGHTNING_WORKER, server, tmp_path)
    assert (tmp_path / "out" / "ckpt" / f"epoch=0-step={K}.ckpt").is_file()
    assert marker["sent_before"] < 2 * K
    # The callback logs lr at every step (log_every_n_steps=1) and forwards the module's train_loss (on_step only,
    # so Lightning names it train_loss) at every step: both at steps 1..K. Lightning hands step K's train_loss to
    # its loggers after on_train_batch_end, where ModelCheckpoint saves (and the callback's on_save_checkpoint
    # calls run.checkpoint()); a job resumed from the step-K checkpoint never logs it again.
    assert_stored_exactly(server.url, marker["run_id"], {"lr": K, "train_loss": K})


def test_huggingface_callback_kill_after_checkpoint_loses_nothing(server: LiveServer, tmp_path: Path) -> None:
    marker = run_killed_job(HUGGINGFACE_WORKER, server, tmp_path)
    assert (tmp_path / "out" / "hf" / f"checkpoint-{K}").is_dir()
    assert marker["sent_before"] < 3 * K
    # logging_steps=1: the Trainer logs loss, grad_norm and learning_rate at every step (its epoch goes with the
    # points, not as a series).
    assert_stored_exactly(server.url, marker["run_id"], {"loss": K, "grad_norm": K, "learning_rate": K})


# --- the server is down at checkpoint time ----------------------------------------------------------------------


def spooled_pairs(spool: Path) -> set[tuple[str, int]]:
    lines = (spool / "pending.jsonl").read_text().splitlines()
    return {(p["key"], p["step"]) for line in lines for p in json.loads(line)["points"]}


def test_pytorch_hook_checkpoint_while_the_server_is_down_survives_kill(settings: Settings, tmp_path: Path) -> None:
    delivered, after = 2, 2  # steps 1..2 stored while up; checkpoint at K while down; killed at K + 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(LiveServer(create_app(settings), port=port))
        proc = stack.enter_context(job(DOWN_WORKER, tmp_path, url, spool, tmp_path / "out", K, delivered, after))
        run_id = wait_for_marker(tmp_path / "out" / "delivered", proc, tmp_path / "job.log")["run_id"]
        live.__exit__(None, None, None)  # the server is down from here on (exiting twice is harmless)
        (tmp_path / "out" / "server-down").touch()
        marker = wait_for_marker(tmp_path / "out" / "killed-here", proc, tmp_path / "job.log")
        kill9(proc)
    assert marker == {"run_id": run_id, "step": K + after, "checkpoints": [False, False]}
    assert (tmp_path / "out" / "checkpoint.pt").is_file()
    # What the server never stored is on disk: the steps after the flush, up to the kill.
    assert spooled_pairs(spool) == {(key, s) for key in ("lr", "loss") for s in range(delivered + 1, K + after + 1)}

    with LiveServer(create_app(settings), port=port):
        with trainer.start_run(url, run_id=run_id, spool_dir=spool, resume_step=K) as run:
            assert run.flush(timeout=15)
        assert_stored_exactly(url, run_id, {"lr": K, "loss": K})
