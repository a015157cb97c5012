"""One pass of live detection over a run: the stored points it has not seen yet, in step order.

Everything a pass changes -- the detector's state, the stages, the decisions and their commands -- is
written in one transaction together with the position it reached, so a server that stops at any moment
resumes from the last committed pass and makes exactly the decisions it would have made without stopping.

Three readers follow the stored points, each with its own position in ``detector_states``:

* stages: the run's LR key (``lr`` by default). Stage 0 starts at its first point; every change of the
  logged LR closes the current stage and opens the next (``source`` ``lr_change``). Each stage's ``summary``
  holds the monitored metric's count, first, last, min and max over the stage.
* the stage summaries: every monitored point, as it is stored (``last_step``: how far detection has examined
  the run, what ``GET /runs/{id}/detection`` reports and waits on).
* the detector, through :class:`server.detectors.feed.Feeder` -- the same loop ``stagewatch replay`` and the
  benchmarks use. In approve and auto mode a decision *waits* for its outcome: nothing more is fed to the
  detector until the decision is applied (the points up to the step the worker applied it at are skipped: they
  were trained at the old LR after the stage had ended), or is rejected, expires or is superseded (the detector
  is told it was not applied and its stage starts again). So no decision is ever computed on the premise that a
  waiting one was applied. In observe mode a decision is only noted.

A new detector configuration (``PATCH /runs/{id}``) or a rewind rebuilds the detector from the first point,
silently, every past decision taken as not applied: decisions the old configuration made stand, and the new one
decides only on points to come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from server.detectors import Decision as DetectorDecision
from server.detectors import Detector, make_detector
from server.detectors.feed import Feeder, FeedState, Outcome
from server.models import DetectorState, Run, Stage, utcnow
from server.schemas import StagePublic
from server.store import decisions
from server.store import detection as store
from server.store.detection import CHUNK
from server.store.feed import add_feed_event
from server.store.points import driver_execute, from_driver, to_driver


@dataclass
class PassResult:
    """What a pass changed: whether the worker has a new command, and whether subscribers have news."""

    commands: bool = False
    changed: bool = False
    decisions: list[int] = field(default_factory=list)


def _lr_key(run: Run) -> str:
    return _lr_key_of(run.detector)


def _lr_key_of(detector: dict[str, Any] | None) -> str:
    return str((detector or {}).get("lr_key", "lr"))


def build_detector(config: dict[str, Any]) -> Detector[Any]:
    return make_detector(str(config["name"]), config.get("params") or {})


def load_feeder(row: DetectorState, outcome: Outcome) -> Feeder:
    """The run's detector and its feeding position, as the last pass left them."""
    detector = build_detector(row.config)
    state = row.state or {}
    if not state:
        return Feeder(detector, FeedState(), outcome=outcome)
    if "feed" in state:
        if state["detector"]:
            detector.load_state_dict(state["detector"])
        feed = FeedState.from_dict(state["feed"])
    else:  # written before the feeder existed: the detector's state alone, fed up to row.last_step
        detector.load_state_dict(state)
        feed = FeedState(last_step=row.last_step)
    return Feeder(detector, feed, outcome=outcome)


def _save_feeder(row: DetectorState, feeder: Feeder) -> None:
    row.state = {"detector": feeder.detector.state_dict(), "feed": feeder.state.to_dict()}


def _outcome(run: Run) -> Outcome:
    """Approve and auto mode wait for each decision's outcome; observe mode (and a run that ended) only notes."""
    return "wait" if run.status == "running" and run.mode != "observe" else "observed"


def _stage_event(session: Session, stage: Stage) -> None:
    add_feed_event(session, stage.run_id, "stage", StagePublic.model_validate(stage, from_attributes=True).model_dump())


class _Stages:
    """The stages a pass can touch, kept in memory for one pass: the open one and any that end after
    ``from_step`` (earlier stages are final and never read)."""

    def __init__(self, session: Session, run_id: int, from_step: int | None) -> None:
        self.session = session
        self.run_id = run_id
        self.rows = store.touchable_stages(session, run_id, from_step)
        self.touched: dict[int, Stage] = {}  # by index: the rows this pass changed

    def open(self, start_step: int, lr: float | None, source: str) -> Stage:
        if self.rows and self.rows[-1].end_step is None:
            self.rows[-1].end_step = start_step - 1
            self.touched[self.rows[-1].index] = self.rows[-1]
        stage = Stage(
            run_id=self.run_id,
            index=self.rows[-1].index + 1 if self.rows else 0,
            start_step=start_step,
            end_step=None,
            lr=lr,
            source=source,
            summary={},
            created_at=utcnow(),
        )
        self.session.add(stage)  # ORM: a new row of this pass's transaction
        self.rows.append(stage)
        self.touched[stage.index] = stage
        return stage

    def at(self, step: int) -> Stage | None:
        for stage in reversed(self.rows):
            if stage.start_step <= step:
                return stage
        return self.rows[0] if self.rows else None

    def add_value(self, metric: str, step: int, value: float | None) -> None:
        stage = self.at(step)
        if stage is None:
            stage = self.open(step, None, "start")
        if value is None or not math.isfinite(value):
            return
        summary: dict[str, Any] = (
            dict(stage.summary) if stage.summary.get("metric") == metric else {"metric": metric, "count": 0}
        )
        if summary["count"] == 0:
            summary.update(first=value, first_step=step, min=value, max=value)
        summary["count"] += 1
        summary.update(last=value, last_step=step, min=min(summary["min"], value), max=max(summary["max"], value))
        stage.summary = summary
        self.touched[stage.index] = stage

    def publish(self) -> bool:
        self.session.flush()
        for index in sorted(self.touched):
            _stage_event(self.session, self.touched[index])
        return bool(self.touched)


def _follow_lr(session: Session, run: Run, row: DetectorState, stages: _Stages) -> None:
    """Stages from the logged LR: every change of value opens a new stage."""
    lr_series = store.series_id(session, run.id, _lr_key(run))
    while True:
        points = store.points_after(session, lr_series, row.lr_step)
        for step, value, _epoch in points:
            row.lr_step = step
            if value is None or not math.isfinite(value):
                continue
            if not stages.rows:
                stages.open(step, value, "start")
            elif stages.rows[-1].lr is None:
                stages.rows[-1].lr = value
                stages.touched[stages.rows[-1].index] = stages.rows[-1]
            elif value != row.lr:
                stages.open(step, value, "lr_change")
            row.lr = value
        if len(points) < CHUNK:
            return


def _on_decision(
    session: Session,
    run: Run,
    feeder: Feeder,
    decision: DetectorDecision,
    metric: str,
    result: PassResult,
    stages: _Stages | None,
) -> None:
    detector = feeder.detector
    evidence = {**decision.evidence.to_dict(), "metric": metric, "detector": detector.name}
    # The stage the decision judged, as the API and the page show it (the detector counts its own stage from the
    # first point it was fed after the LR change or restart, which lies inside that stage).
    start = decision.evidence.details.get("stage_start_step")
    judged_from = start if isinstance(start, int) else decision.evidence.window[0]
    stage = stages.at(judged_from) if stages is not None else None
    if stage is not None and stage.start_step <= judged_from:
        evidence["stage"] = {"index": stage.index, "start_step": stage.start_step, "lr": stage.lr}
    source = f"detector:{detector.name}"
    observe = feeder.outcome == "observed"
    created = decisions.create(
        session,
        run,
        action=decision.action,
        factor=decision.factor if decision.action == "decay" else None,
        lr=None,
        step=decision.step,
        source=source,
        actor=source,
        evidence=evidence,
        reason=decision.evidence.explanation,
        status="observed" if observe else "proposed",
    )
    result.decisions.append(created.id)
    if observe:
        return
    assert feeder.state.waiting is not None
    feeder.state.waiting["id"] = created.id
    if run.mode == "auto":
        decisions.transition(session, created, "approved", actor="auto", note="auto mode")
        result.commands = True


# A waiting decision in one of these has been decided: applied, or never to be.
_NOT_APPLIED = frozenset({"rejected", "expired", "superseded", "failed", "observed"})


def _resolve_waiting(session: Session, feeder: Feeder) -> None:
    """Tells the feeder what became of the decision it waits on, once that is known."""
    waiting = feeder.state.waiting
    if waiting is None:
        return
    decision = store.decision(session, waiting["id"]) if "id" in waiting else None
    if decision is None:
        feeder.resolve(applied=False)
    elif decision.status == "applied":
        feeder.resolve(applied=True, at_step=decision.applied_step)
    elif decision.status in _NOT_APPLIED:
        feeder.resolve(applied=False)


def _follow_metric(session: Session, run: Run, row: DetectorState, stages: _Stages, metric: str) -> None:
    """Stage summaries from every stored monitored point; ``row.last_step`` is how far detection has looked."""
    series = store.series_id(session, run.id, metric)
    while True:
        points = store.points_after(session, series, row.last_step)
        for step, value, _epoch in points:
            stages.add_value(metric, step, value)
            row.last_step = step
        if len(points) < CHUNK:
            return


def _feed_detector(
    session: Session, run: Run, row: DetectorState, feeder: Feeder, *, emit: bool, stages: _Stages | None = None
) -> PassResult:
    """Feeds the monitored points the detector has not consumed (with the logged LR), acting on decisions."""
    result = PassResult()
    metric = str(row.config.get("metric", "epoch/train_loss"))
    metric_series = store.series_id(session, run.id, metric)
    lr_series = store.series_id(session, run.id, _lr_key(run))
    while True:
        _resolve_waiting(session, feeder)
        if feeder.waiting:
            return result
        after = feeder.state.last_step
        points = store.points_after(session, metric_series, after)
        if not points:
            return result
        lrs = store.points_after(session, lr_series, after, upto=points[-1][0], limit=10 * CHUNK)
        made = feeder.feed(
            points,
            [(step, value) for step, value, _epoch in lrs],
            hold_until_step=row.hold_until_step,
            hold_until_epoch=row.hold_until_epoch,
        )
        if emit:
            for decision in made:
                _on_decision(session, run, feeder, decision, metric, result, stages)
        if len(points) < CHUNK and not feeder.waiting:
            return result


def process_run(session: Session, run_id: int) -> PassResult:
    """One pass over ``run_id``; call inside a write transaction."""
    quick = _quick_pass(session, run_id)
    if quick is not None:
        return quick
    # Reads must not flush the half-updated state row each time (a dozen UPDATEs per pass): flush explicitly.
    with session.no_autoflush:
        return _process_run(session, run_id)


def _quick_pass(session: Session, run_id: int) -> PassResult | None:
    """The pass of most commits, at driver level: a run without a detector whose stages are under way and whose
    new LR points (if any) repeat the LR in effect. The full pass would only move ``lr_step`` (and stamp
    ``updated_at``) -- so this does exactly that, in ~0.2 ms instead of ~2 ms of ORM work, which every ingest
    paid and, on SQLite, under the database's write lock. A pass with nothing to follow writes nothing (the full
    pass would stamp ``updated_at``, which nothing reads). None: the full pass is needed (a detector, a first
    pass, a new LR value, a stage to open or fill in, more points than one read)."""
    lock = " FOR UPDATE" if session.get_bind().dialect.name == "postgresql" else ""  # run row first, as all writers
    run = driver_execute(session, f"SELECT detector FROM runs WHERE id = ?{lock}", (run_id,))
    if not run:
        return PassResult()  # as _process_run: no such run (deleted meanwhile)
    if from_driver(session, "runs", "detector", run[0][0]) is not None:
        return None
    state = driver_execute(
        session, f"SELECT config, lr, lr_step FROM detector_states WHERE run_id = ?{lock}", (run_id,)
    )
    if not state:
        return None  # the first pass writes the state row
    config, lr, lr_step = state[0]
    if from_driver(session, "detector_states", "config", config) != {}:
        return None  # the detector was removed: the full pass forgets its configuration
    lr_series = driver_execute(
        session, "SELECT id FROM series WHERE run_id = ? AND key = ?", (run_id, _lr_key_of(None))
    )
    if not lr_series:
        return PassResult()  # no LR logged: nothing to follow
    points = driver_execute(
        session,
        "SELECT step, value FROM metric_points WHERE series_id = ? AND step > ? ORDER BY step LIMIT ?",
        (lr_series[0][0], -1 if lr_step is None else lr_step, CHUNK),  # steps are >= 0
    )
    if not points:
        return PassResult()  # no new LR point: nothing to follow
    if lr is None or len(points) >= CHUNK or any(v is not None and math.isfinite(v) and v != lr for _, v in points):
        return None  # the first LR or a new one: a stage opens or gets its LR
    # _follow_lr works on the last touchable stage: with an open last stage that is it; it must have its LR.
    last = driver_execute(
        session, 'SELECT end_step, lr FROM stages WHERE run_id = ? ORDER BY "index" DESC LIMIT 1', (run_id,)
    )
    if not last or last[0][0] is not None or last[0][1] is None:
        return None
    driver_execute(
        session,
        "UPDATE detector_states SET lr_step = ?, updated_at = ? WHERE run_id = ?",
        (points[-1][0], to_driver(session, "detector_states", "updated_at", utcnow()), run_id),
    )
    return PassResult()


def _first_touchable(row: DetectorState, config: dict[str, Any]) -> int | None:
    """The first step whose stage this pass may change (None: any)."""
    if row.lr_step is None:
        return None
    if not config:
        return row.lr_step  # stages only follow the LR
    if row.config != config or row.last_step is None:
        return None  # a rebuild: the detector's position moves
    return min(row.lr_step, row.last_step)


def _process_run(session: Session, run_id: int) -> PassResult:
    run = store.lock_run(session, run_id)
    if run is None:
        return PassResult()
    config = dict(run.detector) if run.detector is not None else {}
    row = store.state_row(session, run, config)
    stages = _Stages(session, run.id, _first_touchable(row, config))
    _follow_lr(session, run, row, stages)
    result = PassResult()
    if not config:
        row.config = {}
    else:
        if row.config != config:
            # A new configuration: rebuild from the first point without acting on the past.
            row.config = config
            rebuilt = Feeder(build_detector(config), outcome="observed")
            _feed_detector(session, run, row, rebuilt, emit=False)
            _save_feeder(row, rebuilt)
        feeder = load_feeder(row, _outcome(run))  # before the summaries move row.last_step
        _follow_metric(session, run, row, stages, str(config.get("metric", "epoch/train_loss")))
        result = _feed_detector(session, run, row, feeder, emit=True, stages=stages)
        _save_feeder(row, feeder)
    row.updated_at = utcnow()
    result.changed = stages.publish() or bool(result.decisions)
    return result
