"""The training loop: assemble -> loop {step -> guard -> report -> save} -> outcome.

Each concern is one call, and the component decides inside whether anything happens at this step:
run assembly is train/run.py, the step's mechanics train/step.py, the guard's checks and decisions
train/guard.py, what the run reports and its outcome train/report.py (docs/design.md §5).
"""

from __future__ import annotations

from pipeline import distributed as dist
from pipeline.config import Config
from pipeline.train import faults
from pipeline.train.guard import ROLLED_BACK, DivergenceStop
from pipeline.train.report import Reporter, every, final_checks, write_failure, write_outcome
from pipeline.train.run import assemble
from pipeline.train.step import train_step


def train(cfg: Config) -> dict:
    """Train to ``cfg.train.steps``; every way out writes one summary.json (report.write_outcome).

    Returns the summary of a finished, preempted or diverged run; a failure (any other exception)
    writes its summary and re-raises.
    """
    dist.setup()
    run = None
    try:
        run = assemble(cfg)
        state, steps = run.state, cfg.train.steps
        batches, reporter = iter(run.loader), Reporter(run)
        while state.step < steps:
            metrics, preempted, x = train_step(run, batches)
            saving = preempted or every(state.step, cfg.train.save_every) or state.step == steps
            rolled_back = run.guard.step(run, metrics, x, saving) == ROLLED_BACK
            reporter.step(metrics)
            # after a rollback the weights are the target's: saving them again as new would only
            # shadow it (the guard's escalation goes by the target's step)
            if saving and not (rolled_back and not preempted and state.step < steps):
                run.save()
            faults.maybe_kill(cfg.faults, state.step)
            if preempted:
                saved = f"SIGTERM: checkpoint at step {state.step} saved"
                dist.say(f"{saved}; exiting so the job can be requeued")
                return write_outcome(cfg, run, "preempted")
        return write_outcome(cfg, run, **final_checks(run))
    except DivergenceStop as stop:  # every rank alike: a result of the run, not a crash
        return write_outcome(cfg, run, "diverged", reason=str(stop), last_events=stop.events)
    except BaseException as error:
        write_failure(cfg, run, error)
        raise
    finally:
        if run is not None:
            run.preemption.uninstall()
