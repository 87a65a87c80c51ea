"""One training loop for every erasure method.

A method supplies a `Method`: its tensors (by file key; the trainable ones are Parameters with requires_grad),
its loss (an object with `.loss(generator) -> (scalar loss, plan)`, e.g. UnGuideObjective) and how to write its
file. The loop owns the rest:

    seeded_generator   one CPU generator from the seed: the method's init draws first, then every iteration's
    Trainer.step       zero_grad -> loss -> (non-finite: stop) -> backward -> snapshot -> optimiser step
    StopSignals        Ctrl-C (SIGINT) and SIGTERM (timeout, cluster schedulers): state saved, partial file
                       written, status "interrupted", exit 130 / 143; a signal during the update waits for its end
    TrainingRun        resume (state.pt, refused when the settings' fingerprint differs), snapshots every
                       save_every iterations, train_config.json, losses.csv / losses.png, the final file;
                       with an ErasureCheck (ldm/erasure/check.py): checks every `every` iterations and at the
                       planned end, and trains on until the check passes or max_iterations; with restarts,
                       an adapter that has not passed by then is dropped and the run starts over from a fresh
                       one (attempt k: seed + RESTART_SEED_STRIDE * k), keeping the first that passes (or the last)

Exit codes: 0 done, 1 loss became NaN/inf (last good file kept), 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""
import csv
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.memory import format_memory, memory_record
from ldm.runs import write_json
from ldm.erasure.settings import TrainSettings
from ldm.errors import UserError

EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
RESTART_SEED_STRIDE = 1000  # attempt k of a run with seed s draws from seed s + 1000 k: apart from a sweep's seeds


def seeded_generator(seed: int) -> torch.Generator:
    """The run's CPU generator (adapter init, then every draw); also seeds torch's global generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class Method:
    tensors: dict[str, torch.Tensor]  # the method's tensors by file key, e.g. "<path>.lora.A" [in, r] (Parameters)
    objective: object                 # .loss(generator) -> (scalar loss with grad, plan with .t_enc and .t)
    save: Callable[[Path, dict[str, str]], None]  # writes the method's file with this extra metadata

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in self.tensors.values() if t.requires_grad]

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in self.tensors.items():
            v.copy_(tensors[k])


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops training like Ctrl-C (exit 143 instead of 130)."""


class StopSignals:
    """SIGINT / SIGTERM outside the optimiser update raise KeyboardInterrupt / Terminated at once (the iteration
    in progress is dropped: nothing of it was applied); during the update they wait for the end of the iteration."""

    SIGNALS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

    def __init__(self):
        self.critical, self.pending = False, None
        self.previous: dict[int, object] = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: keep the default behaviour
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handler(self, signum, frame):
        if self.critical:
            self.pending = self.pending or signum
        else:
            raise self.SIGNALS[signum]

    def leave_critical(self) -> None:
        self.critical = False
        if self.pending:
            signum, self.pending = self.pending, None
            raise self.SIGNALS[signum]


class Trainer:
    """The optimisation state of a run: the method, Adam on its trainable tensors, the seeded generator, the
    losses and the time spent. `step` is one iteration; bench_train.py times exactly this."""

    def __init__(self, method: Method, lr: float, generator: torch.Generator, autocast_dtype=None):
        self.method, self.generator = method, generator
        self.optimizer = torch.optim.Adam(method.parameters(), lr=lr)
        self.scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
        self.losses: list[float] = []
        self.done, self.train_seconds, self.session_seconds = 0, 0.0, 0.0
        self.gen_state = generator.get_state()  # where the next (or the interrupted) iteration draws from
        self.snapshot: dict[str, torch.Tensor] | None = None  # the tensors that scored the last finite loss
        self.signals = StopSignals()

    def step(self):
        """One iteration -> (loss value, plan). A non-finite loss is returned without any update."""
        self.gen_state = self.generator.get_state()
        tic = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, plan = self.method.objective.loss(self.generator)
        value = float(loss.detach())
        if not torch.isfinite(torch.tensor(value)):
            return value, plan
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.snapshot = self.method.snapshot()
        self.signals.critical = True  # the update, the loss record and the count belong together
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.losses.append(value)
        self.done += 1
        dt = time.perf_counter() - tic
        self.session_seconds += dt
        self.train_seconds += dt
        self.gen_state = self.generator.get_state()
        self.signals.leave_critical()
        return value, plan

    def state_dict(self, fingerprint: dict) -> dict:
        """state.pt: everything needed to continue bit-exactly, and the settings it was trained under."""
        return {"iteration": self.done, "args": fingerprint, "generator": self.gen_state,
                "torch_rng": torch.get_rng_state(),
                "lora": {k: v.detach().cpu().clone() for k, v in self.method.tensors.items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else {},
                "losses": torch.tensor(self.losses, dtype=torch.float64), "train_seconds": float(self.train_seconds),
                "objective": self.method.objective.state_dict() if hasattr(self.method.objective, "state_dict")
                else {}}

    def load_state_dict(self, state: dict) -> None:
        self.method.restore(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.gen_state = self.generator.get_state()
        torch.set_rng_state(state["torch_rng"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.done, self.losses = int(state["iteration"]), [float(v) for v in state["losses"]]
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if hasattr(self.method.objective, "load_state_dict"):  # e.g. the adversarial term's attacker
            self.method.objective.load_state_dict(state.get("objective") or {})


def read_state(path: Path, fingerprint: dict, tensor_keys, legacy: dict | None = None) -> dict:
    """A run's state.pt, refused when unreadable or written under other settings or for other tensors.
    legacy: {key: value} for fingerprint keys an older state.pt lacks (read as that value)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
    if not isinstance(state, dict) or not {"iteration", "args", "generator", "lora", "optimizer"} <= set(state):
        raise UserError(f"{path}: not a training checkpoint of train.py")
    saved = {**(legacy or {}), **state["args"]}
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"{path}: cannot resume, the run's settings differ ({'; '.join(diff)[:400]})")
    if set(tensor_keys) != set(state["lora"]):
        raise UserError(f"{path}: its adapter tensors do not match the selected layers")
    return state


class RunFiles:
    """Where a run writes: <output_dir>/<run name>/{models/<stem>.safetensors, models/<stem>_partial.safetensors,
    checkpoint/state.pt, train_config.json, losses.csv, losses.png}.

    THE rule for "this run finished": its final file exists (`finished()`). Completion (TrainingRun._complete)
    saves state.pt at the last iteration, writes the file under a pending name, writes train_config.json with
    status "complete", and only then renames the pending file to its final name; a kill anywhere in between leaves
    no final file beside a record that says otherwise. `recover()` ends an interrupted completion: the pending file
    is renamed when the record already says complete, removed otherwise (then --resume continues from state.pt)."""

    def __init__(self, run_dir: Path, stem: str = "lora"):
        self.run_dir = Path(run_dir)
        self.final = self.run_dir / "models" / f"{stem}.safetensors"
        self.pending = self.run_dir / "models" / f".{stem}.pending.safetensors"
        self.partial = self.run_dir / "models" / f"{stem}_partial.safetensors"
        self.state = self.run_dir / "checkpoint" / "state.pt"
        self.config = self.run_dir / "train_config.json"

    def recover(self) -> None:
        """Finish or undo a completion cut short (see the class); drop what a finished run no longer needs."""
        if self.pending.is_file():
            try:
                status = json.loads(self.config.read_text(encoding="utf-8")).get("status")
            except (OSError, ValueError, AttributeError):
                status = None
            if status == "complete":
                os.replace(self.pending, self.final)
            else:
                self.pending.unlink()
        if self.final.is_file():
            for stale in (self.partial, self.state):
                stale.unlink(missing_ok=True)

    def finished(self) -> bool:
        """Whether the run finished (its final file exists, after `recover`)."""
        self.recover()
        return self.final.is_file()

    def check(self, resume: bool) -> None:
        """Refuse --resume without a checkpoint, a fresh run over an unfinished one and a run that finished."""
        if self.finished():
            raise UserError(f"{self.run_dir}: that run already finished ({self.final}); delete that directory to "
                            "train it again")
        if resume and not self.state.is_file():
            raise UserError(f"--resume: no checkpoint at {self.state}"
                            + (" (that run already finished)" if self.final.is_file() else ""))
        if not resume and self.state.is_file():
            raise UserError(f"{self.run_dir} holds an unfinished run ({self.state}); pass --resume to continue it, "
                            "or delete that directory to start over")


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_losses(run_dir: Path, losses: list[float]) -> str:
    with open(run_dir / "losses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "loss"])
        w.writerows((i, repr(v)) for i, v in enumerate(losses))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "losses.csv written; losses.png skipped (matplotlib is not installed)"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8, label="loss")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(1).tolist()
        ax.plot(range(k - 1, len(losses)), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MSE loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "losses.png", dpi=100)
    plt.close(fig)
    return "losses.csv and losses.png written"


class TrainingRun:
    """A run from its settings to its files: resume, iterate, and end complete, diverged or interrupted."""

    def __init__(self, settings: TrainSettings, method: Method, generator: torch.Generator, files: RunFiles,
                 device: torch.device, autocast_dtype=None, check=None,
                 calibrate: Callable[[], dict] | None = None,
                 restart: Callable[[int], tuple[Method, torch.Generator]] | None = None, restarts: int = 0):
        self.settings, self.method, self.files, self.device = settings, method, files, device
        self.autocast_dtype = autocast_dtype
        self.trainer = Trainer(method, settings.lr, generator, autocast_dtype)
        self.start = 0
        self.record = settings.config_record()
        self.check = check  # an ldm.erasure.check.ErasureCheck, or None
        self.checks: list[dict] = []  # its results, in order (this attempt's)
        self.calibrate = calibrate  # () -> the finished adapter's calibration record (ldm.erasure.calibration.measure)
        self.calibration: dict | None = None
        if restarts and (check is None or restart is None):
            raise ValueError("restarts need an erasure check and a restart(attempt) -> (method, generator)")
        self.restart, self.restarts = restart, int(restarts)  # restart(k): attempt k's fresh method and generator
        self.attempt = 0
        self.attempts: list[dict] = []  # the dropped attempts' records (seed, iterations, their checks)

    def run(self) -> int:
        """Train; returns the exit code (0, EXIT_DIVERGED, EXIT_INTERRUPTED or EXIT_TERMINATED)."""
        s, t = self.settings, self.trainer
        if s.resume:
            state = read_state(self.files.state, s.fingerprint(), self.method.tensors, s.legacy_values())
            self.attempts = self._earlier_attempts(int(state.get("attempt", 0)))
            if self.attempts:  # the checkpoint is of a later attempt: its fresh adapter first, then the state
                self._start_attempt(len(self.attempts))
                t = self.trainer
            t.load_state_dict(state)
            self.start = t.done
            self.checks = self._earlier_checks()
            print(f"resumed from {self.files.state} at iteration {self.start}/{s.iterations}"
                  + (f" (attempt {self.attempt}, seed {self.attempt_seed})" if self.attempt else ""))
        self.record["iterations_done"] = self.start
        (self.files.run_dir / "models").mkdir(parents=True, exist_ok=True)
        write_json(self.files.config, self.record)
        bar = tqdm(total=s.iterations, initial=self.start, desc=f"erasing {s.class_name}", dynamic_ncols=True)
        try:
            with t.signals:
                bad = self._iterate(bar)
        except KeyboardInterrupt as exc:
            bar.close()
            return self._interrupted(isinstance(exc, Terminated))
        bar.close()
        return self._diverged(*bad) if bad else self._complete()

    def _iterate(self, bar) -> tuple | None:
        """Iterations up to settings.iterations (further while the erasure check asks for it); None, or
        (iteration, value, plan) of a non-finite loss."""
        s, t = self.settings, self.trainer
        goal = max(s.iterations, t.done)
        while True:
            t = self.trainer  # a restart replaces it
            while t.done < goal:
                i = t.done
                value, plan = t.step()
                if t.done == i:  # non-finite loss: no update
                    return i, value, plan
                bar.update(1)
                bar.set_postfix(loss=f"{value:.5f}", t_enc=plan.t_enc)
                if getattr(self.method.objective, "stop_requested", False):  # a method's own stop (SepCE's momentum)
                    return None
                if self.check is not None and t.done % self.check.s.every == 0 and t.done < goal:
                    self._check()
                if t.done % s.save_every == 0 and t.done < goal:
                    self._save_state()
            if self.check is None or self._check()["passed"]:
                return None
            if t.done >= self.check.s.max_iterations:
                if self.attempt >= self.restarts:
                    return None
                self._drop_attempt()  # not erased by the cap: start over from a fresh adapter
                goal = s.iterations
                bar.reset(total=goal)
                continue
            goal = min(t.done + self.check.s.every, self.check.s.max_iterations)  # not erased yet: train on
            bar.total = goal
            bar.refresh()

    @property
    def attempt_seed(self) -> int:
        return self.settings.seed + RESTART_SEED_STRIDE * self.attempt

    def _start_attempt(self, k: int) -> None:
        """Attempt k: a fresh method and generator from restart(k), a fresh optimiser (same stop signals)."""
        signals = self.trainer.signals
        self.attempt = k
        self.method, generator = self.restart(k)
        self.trainer = Trainer(self.method, self.settings.lr, generator, self.autocast_dtype)
        self.trainer.signals = signals

    def _drop_attempt(self) -> None:
        """The check has not passed at the cap: record this attempt, then start the next (state.pt follows)."""
        t, last = self.trainer, self.checks[-1]
        self.attempts.append({"attempt": self.attempt, "seed": self.attempt_seed, "iterations_done": t.done,
                              "train_seconds": t.train_seconds, "ratio": last["ratio"], "rate": last["rate"],
                              "kept": last.get("kept"), "history": self.checks})
        print(f"erasure check not passed by iteration {t.done} (attempt {self.attempt}, seed {self.attempt_seed}): "
              f"starting over from a fresh adapter ({self.attempt + 1} of {self.restarts} restarts, seed "
              f"{self.attempt_seed + RESTART_SEED_STRIDE})", flush=True)
        self._start_attempt(self.attempt + 1)
        self.checks = []
        self.record["restarts"] = self.attempts
        write_json(self.files.config, self.record)  # the dropped attempts survive a kill before the next save
        self._save_state()

    def _earlier_attempts(self, attempt: int) -> list[dict]:
        """The records of the attempts before `attempt` (train_config.json of the sessions before a resume)."""
        if attempt == 0:
            return []
        try:
            old = json.loads(self.files.config.read_text(encoding="utf-8")).get("restarts") or []
        except (OSError, ValueError):
            old = []
        if len(old) < attempt:
            raise UserError(f"{self.files.state}: a checkpoint of attempt {attempt} but {self.files.config} records "
                            f"{len(old)} dropped attempts; delete {self.files.run_dir} to train again")
        return old[:attempt]

    def _earlier_checks(self) -> list[dict]:
        """The erasure check's results of the sessions before a resume (train_config.json), up to the iteration
        resumed from: the history stays whole across sessions."""
        if self.check is None or not self.files.config.is_file():
            return []
        try:
            old = json.loads(self.files.config.read_text(encoding="utf-8")).get("erasure_check") or {}
        except (OSError, ValueError):
            return []
        return [c for c in old.get("history") or [] if isinstance(c, dict)
                and isinstance(c.get("iteration"), int) and c["iteration"] <= self.start]

    def _check(self) -> dict:
        """Run the erasure check at this iteration (once), print and record it."""
        if self.checks and self.checks[-1]["iteration"] == self.trainer.done:
            return self.checks[-1]
        r = self.check(self.trainer.done)
        self.checks.append(r)
        rate = "" if r["rate"] is None else f", adapter-alone concept rate {r['rate']:.0%}"
        rate += "" if r.get("kept") is None else f", preserved prompts kept {r['kept']:.0%}"
        print(f"erasure check at iteration {r['iteration']}: d(target)/d(\"\") = {r['ratio']:.2f}{rate} -> "
              f"{'passed' if r['passed'] else 'not yet'}", flush=True)
        return r

    def _check_record(self) -> dict | None:
        if self.check is None:
            return None
        last = self.checks[-1] if self.checks else None
        return {"settings": self.check.s.record(), "passed": bool(last and last["passed"]),
                "ratio": last and last["ratio"], "rate": last and last["rate"], "kept": last and last.get("kept"),
                "history": self.checks}

    def _save_state(self) -> None:
        state = self.trainer.state_dict(self.settings.fingerprint())
        if self.attempt:
            state["attempt"] = self.attempt
        atomic_torch_save(state, self.files.state)

    def _finish(self, status: str, path: Path, done: int) -> None:
        """Write the method's file (status in its metadata) and train_config.json (and the losses if asked)."""
        t, losses = self.trainer, self.trainer.losses
        extra = {"complete": "true" if status == "complete" else "false", "status": status,
                 "iterations_done": str(done), **self.settings.adapter_metadata()}
        check = self._check_record()
        if check is not None:
            extra["erasure_check"] = "passed" if check["passed"] else "failed"
        if self.attempt:
            extra["restarts"], extra["attempt_seed"] = str(self.attempt), str(self.attempt_seed)
        if self.calibration is not None and status == "complete":
            extra["calibration"] = json.dumps(self.calibration, sort_keys=True)  # the adapter carries its threshold
        self.method.save(path, extra)
        n_new = done - self.start
        self.record.update({
            "status": status, "iterations_done": done,
            "adapter": str(self.files.final if path == self.files.pending else path),
            "final_loss": losses[-1] if losses else None,
            "average_loss": sum(losses) / len(losses) if losses else None,
            "seconds_per_iteration": t.train_seconds / done if done else None,
            "seconds_per_iteration_this_session": t.session_seconds / n_new if n_new > 0 else None,
            **memory_record(self.device),  # ldm.memory: CUDA max allocated, else the process's peak RSS
        })
        if check is not None:
            self.record["erasure_check"] = check
        if self.restarts or self.attempts:
            self.record.update({"restarts": self.attempts, "attempt": self.attempt, "attempt_seed": self.attempt_seed})
        if self.calibration is not None and status == "complete":
            self.record["calibration"] = self.calibration
        summary = getattr(self.method.objective, "summary", None)  # e.g. the adversarial term's last attack
        self.record.update(summary() if summary is not None else {})
        write_json(self.files.config, self.record)
        if self.settings.save_losses:
            print(write_losses(self.files.run_dir, losses))

    def _diverged(self, i: int, value: float, plan) -> int:
        partial = self.files.partial
        if self.trainer.snapshot is not None:
            self.method.restore(self.trainer.snapshot)
            self._finish("diverged", partial, i - 1)
            where = f"the adapter of iteration {i - 1} (the last finite loss) saved as {partial}"
        else:
            where = "no adapter saved (the first loss was already non-finite)"
        print(f"error: the loss became {value} at iteration {i} (t_enc {plan.t_enc}, t {plan.t}); "
              f"stopped; {where}; try a lower --lr", file=sys.stderr)
        return EXIT_DIVERGED

    def _interrupted(self, terminated: bool) -> int:
        done, f = self.trainer.done, self.files
        self._save_state()
        self._finish("interrupted", f.partial, done)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"{how} at iteration {done}/{self.settings.iterations}: resumable state in {f.state}, partial "
              f"adapter in {f.partial}; continue with the same command plus --resume", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED

    def _complete(self) -> int:
        """state.pt at the last iteration, the file under its pending name, the record "complete", then the rename
        that makes the run finished (RunFiles); a kill in between is resumed or rolled forward, never retrained."""
        f, r = self.files, self.record
        self._save_state()
        if self.calibrate is not None:
            self.calibration = self.calibrate()
            if self.calibration is not None:
                c = self.calibration
                print(f"calibrated threshold: flag when d(p) > {c['threshold']:.3f} d(\"\") ("
                      f"{'separable' if c['separable'] else 'overlap'}, gap {c['gap']:.2f}x); stored in the adapter",
                      flush=True)
        self._finish("complete", f.pending, self.trainer.done)
        os.replace(f.pending, f.final)
        f.recover()  # the finished run's state.pt and partial file go
        print(f"saved {f.final} and {f.config}; final loss {self.trainer.losses[-1]:.6f}, "
              f"mean {r['average_loss']:.6f}, {r['seconds_per_iteration']:.3f} s/it, peak memory "
              f"{format_memory(r)}")
        check = r.get("erasure_check")
        if check and not check["passed"]:
            print(f"warning: the erasure check did not pass by iteration {self.trainer.done} (d(target)/d(\"\") "
                  f"{check['ratio']:.2f}, needs >= {check['settings']['min_ratio']}"
                  + ("" if check["rate"] is None else f"; adapter-alone rate {check['rate']:.0%}, needs <= "
                     f"{check['settings']['max_rate']:.0%}")
                  + ("" if check.get("kept") is None else f"; preserved prompts kept {check['kept']:.0%}, needs >= "
                     f"{check['settings']['min_kept']:.0%}") + "): this adapter may not erase or may damage what it "
                  "preserves; try --check_restarts N, another --seed, a higher --lr or more --iterations",
                  file=sys.stderr)
        return 0
