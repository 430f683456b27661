"""``ramoe sweep CONFIG --dry-run [--calibrate]``: what a sweep would run and what it would cost, with
nothing trained, built, downloaded or written.

Entry: ``dry_run(cfg, calibrate=False) -> dict`` (and its printout). In order:

1. the sweep's own checks (``sweep.check_sweep``: grid, tracking URI, ``sources.check``, general text,
   memory fit), so a bad config fails with the same error as a real run;
2. the plan (``plan``): cells, trials per method, each task's examples and split sizes (a local folder is
   read, a synthetic-world task is counted from its spec, a hub dataset is "unknown" unless its published
   size is in ``PUBLISHED_SIZES``: nothing is downloaded), the trained steps (``cost.steps_of``);
3. the cache (``cached_stages``): which taxonomy / experts artefacts exist in ``cache_dir``, their keys
   computed as stage 1 computes them (``taxonomy.plan`` on ``sources.planned``, digests read-only:
   ``cache.read_only``); a key that needs a model not built yet (a world model, a preset) says so;
4. the rates (``rates``): ``--calibrate`` (calibrate.py: a short sweep of every model and task run here,
   read as an earlier sweep's children; it builds what it needs), else an earlier sweep of this name in
   MLflow (read only), else the stated assumptions of cost.py; and the estimate (cost.py) of this plan and
   of the plan without the savings (``baseline``: every model on the top-level resources, one Tune trial per
   steering setting);
5. the measured phases of that earlier sweep, next to the estimate.

Twins (``grid.twins``) are left out of the estimate as the sweep leaves them out of Tune: an explicit band's
layers come from the model's shape, ``auto``'s from a cached experts.json (read only; ``band_layers``). An auto
band not resolved yet counts as distinct from every explicit band, so its trials are counted in full.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ramoe_ray import asha, cost, experts, grid, sources, sweep, taxonomy, tracking, trial
from ramoe_ray import calibrate as calibration
from ramoe_ray.cache import content_key, read_only
from ramoe_ray.config import ConfigError, RunConfig, band_label
from ramoe_ray.grid import Trial
from ramoe_ray.tasks import TaskDataError, load_parallel, locate, split_ids

# Published sizes (examples per language, the split the loader reads) of the hub datasets the shipped configs
# name: the dry run cannot count a hub dataset offline. From the dataset cards.
PUBLISHED_SIZES = {"juletxara/mgsm": 250, "CohereLabs/Global-MMLU": 14042, "facebook/belebele": 900}
CI_SHARE = 0.25  # assumed share of ci pairs in a train split (sizes the training's ci passes before stage 1 ran)
GENERAL_DOCS = 1000  # general documents stage 1 reads when their file cannot be counted (taxonomy.GENERAL_LIMIT)
EXPERTS_SECONDS = 0.4  # seconds to build one experts.json with its figures (stage 2): the synthetic grid wrote 999, median 0.36 s apart


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Size:
    """A task's examples per language and its split sizes (``tasks.split_ids``), and where the count is from."""

    n: int
    train: int
    val: int
    test: int
    general: int
    note: str


def _size(n: int, general: int, note: str) -> Size:
    parts = split_ids([str(i) for i in range(n)], seed=0)  # sizes depend on n only
    return Size(n, len(parts["train"]), len(parts["validation"]), len(parts["test"]), min(general, GENERAL_DOCS), note)


def _general_docs(path: str | None) -> int:
    if path and Path(path).is_file():
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    return GENERAL_DOCS


def task_size(cfg: RunConfig, planned: RunConfig, i: int) -> Size | None:
    """The i-th task's size (module docstring, 2.); None when unknown offline."""
    t, p = cfg.tasks[i], planned.tasks[i]
    world = sources.world_sizes(t.source)
    if world is not None:
        return _size(world[0], world[1], "synthetic world spec")
    kind, _ = locate(p.source)
    if kind == "local":
        try:
            n = len(load_parallel(p, [cfg.languages[0]])["en"])
        except (TaskDataError, OSError) as e:
            raise ConfigError(f"tasks.{i}.source = {t.source!r}: {e}") from None
        return _size(n, _general_docs(p.general_source), "counted in its files")
    if t.source in PUBLISHED_SIZES:
        return _size(PUBLISHED_SIZES[t.source], _general_docs(p.general_source), "published size (not read offline)")
    return None


def model_steps(cfg: RunConfig, model: str, size: Size | None) -> int | None:
    """Optimizer steps of one training of ``model`` on a task of ``size`` (``train.schedule``'s length)."""
    if size is None:
        return None
    t = cfg.training
    return cost.steps_of(size.train, batch_size=t.batch_size, workers=max(1, trial.train_workers(cfg, model)),
                         epochs=t.epochs, max_steps=t.max_steps)


# ---------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Machine:
    """The cluster the estimate schedules on."""

    cpus: float
    gpus: float

    def as_ray(self) -> dict:
        return {"CPU": self.cpus, "GPU": self.gpus}


def this_machine(cfg: RunConfig) -> Machine:
    """``sweep.cluster``, else this machine (what a local Ray reports)."""
    if cfg.sweep.cluster is not None:
        return Machine(cfg.sweep.cluster.cpus, cfg.sweep.cluster.gpus)
    import torch

    return Machine(float(os.cpu_count() or 1), float(torch.cuda.device_count()))


def _actors(cfg: RunConfig, model: str, machine: Machine) -> tuple[int, float]:
    """(evaluation actors of a trial of ``model``, GPUs they hold): in the trial process, else
    ``resources.inference_actors``, of one GPU each in a GPU plan. (inference.map_rows, with GPUs, starts one
    actor per GPU of the whole cluster, which concurrent trials cannot all have: the plan assumes the
    configured count.)"""
    if trial.eval_actors(cfg, model) == 0:
        return 1, sweep.trial_resources(cfg, model)["gpu"]
    gpu = machine.gpus and cfg.resources_for(model).gpus_per_worker > 0
    return cfg.resources.inference_actors, float(cfg.resources.inference_actors) if gpu else 0.0


def _trained(cfg: RunConfig, t: Trial, size: Size, machine: Machine, first_of_cell: bool) -> cost.Work:
    """A trained trial: its steps, the training's passes (final, with ``training.final_train_pass``; the
    base passes on the first of the cell, base_cache), its validation (English + target), its model loads one
    after the other (the training's, then the evaluation actors', which load at the same time; none when the
    trial validates in its own process, with the training's model: ``trial._one_trial``)."""
    n_ci = round(CI_SHARE * size.train)
    actors, _ = _actors(cfg, t.model, machine)
    second = int(trial.eval_actors(cfg, t.model) > 0)  # validation loads the model again (else the training's)
    final = size.train + n_ci if cfg.training.final_train_pass else 0
    steps, examples, loads = model_steps(cfg, t.model, size), 2 * size.val, 1 + second
    if rungs := trial.rungs(cfg, t):  # ASHA: the expected share trained, a rung's validation per rung reached
        share, reach, end = asha.expected_share(rungs)
        steps, final = round(steps * share), round(final * end)
        examples, loads = round(size.val * sum(reach) + examples * end), 1 + second * round(end)
    passes = final + ((size.train + 2 * n_ci) if first_of_cell else 0)
    return cost.Work(t.model, t.task, steps=steps, passes=passes, examples=examples,
                     loads=loads, actors=actors, gpus=sweep.trial_demand(cfg, t.model)["gpu"])


def _overhead(cfg: RunConfig, model: str, what: str) -> float:
    """``cost.OVERHEAD[cpu|gpu][what]`` for a model's plan."""
    return cost.OVERHEAD["gpu" if cfg.resources_for(model).gpus_per_worker > 0 else "cpu"][what]


def _evaluated(cfg: RunConfig, t: Trial, examples: int, machine: Machine, test: bool = False) -> cost.Work:
    """An evaluation-only unit: a steering unit (a Tune trial), or a test evaluation (a Ray task: no Tune
    trial's fixed cost, ``test_task_s`` instead)."""
    actors, gpus = _actors(cfg, t.model, machine)
    return cost.Work(t.model, t.task, examples=examples, loads=1, actors=actors, gpus=gpus, fixed=not test,
                     extra=_overhead(cfg, t.model, "test_task_s") if test else 0.0)


def trial_units(cfg: RunConfig, trials: list[Trial], sizes: dict, machine: Machine, *, per_cell: bool) -> list[cost.Work]:
    """The trials phase's units (``per_cell``: every steering setting of a cell in one unit, as
    ``sweep.tune_units``; else one per setting). Trials of a task of unknown size are left out."""
    groups = sweep.tune_units(trials) if per_cell else [[dataclasses.asdict(t)] for t in trials]
    out, seen = [], set()
    for g in groups:
        t = Trial(**g[0])
        if sizes[t.task] is None:
            continue
        if t.method == "steering":
            out.append(_evaluated(cfg, t, len(g) * 2 * sizes[t.task].val, machine))
        else:
            out.append(_trained(cfg, t, sizes[t.task], machine, t.cell not in seen))
            seen.add(t.cell)
    return out


def after_units(cfg: RunConfig, trials: list[Trial], sizes: dict, machine: Machine) -> tuple[list, list]:
    """(replicates, tests): each selected (cell, trained method) again per extra seed; a test evaluation of
    every selected (cell, method) and of every replicate."""
    firsts = {(t.cell, t.method): t for t in trials if sizes[t.task] is not None}
    reps, tests = [], []
    for t in firsts.values():
        extra = len(cfg.training.seeds) - 1 if t.method != "steering" else 0
        reps += [_trained(cfg, t, sizes[t.task], machine, False) for _ in range(extra)]
        tests += [_evaluated(cfg, t, 2 * sizes[t.task].test, machine, test=True) for _ in range(1 + extra)]
    return reps, tests


def stage_units(cfg: RunConfig, sizes: dict, machine: Machine) -> list[cost.Work]:
    """Stage 1 per (model, task): English and every target language of the train split and the general
    text, on the inference actors; stage 2's experts.json per (language, band, top-k) at ``EXPERTS_SECONDS``.
    A model's tasks share one pass (``taxonomy.execute_many``): its model load and the pass's start are paid
    by its first task, and a general-text file its tasks share is read once."""
    out = []
    for m in cfg.models:
        gpu = cfg.resources_for(m).gpus_per_worker > 0 and machine.gpus
        actors = int(machine.gpus) if gpu else max(1, cfg.resources.inference_actors)
        n2 = len(cfg.languages) * len(cfg.knobs.bands) * len(cfg.knobs.top_k)
        generals: set = set()
        first = True  # the model's first counted task pays the pass: its load and its start
        for t in cfg.tasks:
            s = sizes[t.name]
            if s is not None:
                general = 0 if t.general_source in generals else s.general
                generals.add(t.general_source)
                out.append(cost.Work(m.name, t.name, examples=(1 + len(cfg.languages)) * s.train + general,
                                     loads=int(first), actors=actors, gpus=float(actors if gpu else 0), fixed=False,
                                     extra=n2 * EXPERTS_SECONDS + (_overhead(cfg, m.name, "stage_pass_s") if first else 0.0)))
                first = False
    return out


def concurrency(cfg: RunConfig, machine: Machine) -> dict[str, int]:
    return {m.name: sweep.max_concurrent(cfg, machine.as_ray(), m.name) for m in cfg.models}


def estimate(cfg: RunConfig, trials: list[Trial], sizes: dict, rates: dict, machine: Machine, *,
             per_cell: bool = True) -> cost.Estimate:
    """The plan's phases (cost.py) on ``machine``."""
    conc = concurrency(cfg, machine)
    reps, tests = after_units(cfg, trials, sizes, machine)
    return cost.Estimate([
        cost.run_phase("stages 1-2", stage_units(cfg, sizes, machine), rates, conc, sequential=True),
        cost.run_phase("trials", trial_units(cfg, trials, sizes, machine, per_cell=per_cell), rates, conc),
        cost.run_phase("replicates", reps, rates, conc),
        cost.run_phase("selection and test", tests, rates, conc),
    ])


def baseline(cfg: RunConfig) -> RunConfig:
    """The plan without this sweep's savings: every model on the top-level resources (no model's own), every
    trial to the end (``sweep.scheduler: grid``)."""
    return cfg.model_copy(update={"models": [m.model_copy(update={"resources": None}) for m in cfg.models],
                                  "sweep": cfg.sweep.model_copy(update={"scheduler": "grid"})})


# ---------------------------------------------------------------------------------------------- the cache


def _exists(cache_dir: str, stage: str, key: str | None) -> bool:
    return key is not None and (Path(cache_dir) / stage / key).is_dir()


def cached_cell(cfg: RunConfig, model, task) -> str:
    """One (model, task)'s artefacts in the cache, keys as stage 1 / 2 compute them (nothing written)."""
    with read_only():
        p = taxonomy.plan(cfg, model, task, list(cfg.languages), "train", general=True)
    langs = " ".join(f"{lang}{'+' if _exists(cfg.cache_dir, 'taxonomy', p.keys[lang]) else '-'}" for lang in p.keys)
    cells = sum(_exists(cfg.cache_dir, "taxonomy", k) for k in p.cell_keys.values())
    keys = [content_key(experts.experts_key_inputs(p, lang, b, k), 24)
            for lang in cfg.languages for b in cfg.knobs.bands for k in cfg.knobs.top_k]
    n_exp = sum(_exists(cfg.cache_dir, "experts", k) for k in keys)
    general = "+" if _exists(cfg.cache_dir, "taxonomy", p.general_key) else "-"
    return (f"taxonomy {langs} (cells {cells}/{len(p.cell_keys)}), general text {general}, experts.json "
            f"{n_exp}/{len(keys)}")


def _unknowable(missing: dict[str, str], model, task) -> str | None:
    """Why a (model, task)'s keys cannot be computed here: something not built yet, or hub data (stage 1
    reads a task's data to plan it; the dry run reads no hub dataset)."""
    why = [x for x in (missing.get(f"models.{model.name}"), missing.get(f"tasks.{task.name}")) if x]
    if not why and locate(task.source)[0] == "hub":
        why = [f"{task.source}: hub data (not read offline)"]
    return "; ".join(why) or None


def cached_stages(planned: RunConfig, missing: dict[str, str]) -> list[str]:
    """Per (model, task): what exists in the cache (``cached_cell``), or why its keys cannot be computed yet."""
    out = []
    for m in planned.models:
        for t in planned.tasks:
            head, why = f"  {m.name}/{t.name}: ", _unknowable(missing, m, t)
            if why:
                out.append(head + f"keys need what is not here yet: {why}")
                continue
            try:
                out.append(head + cached_cell(planned, m, t))
            except (ConfigError, OSError, ValueError) as e:
                out.append(head + f"keys not computable offline ({str(e).splitlines()[0][:160]})")
    return out


def band_layers(cfg: RunConfig, planned: RunConfig, shapes: dict, missing: dict[str, str]) -> tuple[dict, int, int]:
    """(cell id -> band label -> MoE layers, as ``grid.twins`` takes them; auto bands resolved from the cache,
    auto bands in all). Explicit bands from the model's shape; auto from its cached experts.json, else left out."""
    out, resolved, autos = {}, 0, 0
    for m, pm in zip(cfg.models, planned.models):
        for t, pt in zip(cfg.tasks, planned.tasks):
            p = _plan_read_only(planned, pm, pt, missing) if "auto" in cfg.knobs.bands else None
            for lang in cfg.languages:
                cell = out.setdefault(f"{m.name}/{t.name}/{lang}", {})
                for b in cfg.knobs.bands:
                    if b != "auto":
                        cell[band_label(b)] = b.layers(shapes[m.name].moe_layers, shapes[m.name].num_layers)
                        continue
                    autos += 1
                    layers = _cached_auto(planned, p, lang, cfg.knobs.top_k[0]) if p is not None else None
                    if layers is not None:
                        cell["auto"], resolved = layers, resolved + 1
    return out, resolved, autos


def _plan_read_only(planned: RunConfig, model, task, missing: dict[str, str]):
    """Stage 1's plan of a (model, task), digests read only; None when its keys cannot be computed here."""
    if _unknowable(missing, model, task):
        return None
    try:
        with read_only():
            return taxonomy.plan(planned, model, task, list(planned.languages), "train", general=True)
    except (ConfigError, OSError, ValueError):
        return None


def _cached_auto(planned: RunConfig, p, language: str, top_k: int) -> list[int] | None:
    """The layers stage 2 resolved a cell's auto band to, from its cached experts.json; None if not cached."""
    f = Path(planned.cache_dir) / "experts" / content_key(experts.experts_key_inputs(p, language, "auto", top_k), 24)
    f = f / "experts.json"
    return [int(x) for x in json.loads(f.read_text())["band"]["layers"]] if f.is_file() else None


# ---------------------------------------------------------------------------------------------- rates


def earlier_sweep(cfg: RunConfig, uri: str):
    """(children, parent's run data, parent run id) of the newest sweep of this name in MLflow, read only;
    None when there is none (or no database yet)."""
    try:
        client = tracking.read_client(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        parent = tracking.find_parent(client, exp.experiment_id, cfg.name) if exp is not None else None
    except ConfigError:
        return None
    except Exception:  # an unreadable store (old schema, server error): the dry run goes on without it
        return None
    if parent is None:
        return None
    kids = tracking.children(client, exp.experiment_id, parent)
    if not kids.empty:  # a trial ASHA stopped at a rung measures no whole trial; a twin ran nothing
        kids = kids[~tracking.stopped_rows(kids) & ~tracking.twin_rows(kids)]
    return kids, client.get_run(parent).data, parent


def default_rates(cfg: RunConfig, fits: dict, shapes: dict) -> dict:
    """(model, task) -> the stated assumptions (cost.default_rates), sized by the model where it has a GPU."""
    out = {}
    for m in cfg.models:
        f, gpu = fits.get(m.name), cfg.resources_for(m).gpus_per_worker > 0
        total = f.size.total if f else 0
        active = total - (f.size.experts - f.size.per_token) * f.size.expert * len(shapes[m.name].moe_layers) if f else 0
        w = max(1, trial.train_workers(cfg, m.name))
        for t in cfg.tasks:
            out[(m.name, t.name)] = cost.default_rates(
                total, active, workers=w, global_batch=w * cfg.training.batch_size,
                eval_batch=cfg.training.eval_batch_size, max_new_tokens=taxonomy.MAX_NEW_TOKENS,
                generative=t.format == "generative_numeric", gpu=bool(gpu and f))
    return out


def choose_rates(cfg: RunConfig, sizes: dict, fits: dict, shapes: dict, earlier, calibrate: bool, log) -> dict:
    """The rates (module docstring, 4.): calibrated, else from the earlier sweep, else assumed; a pair the
    chosen source lacks keeps the assumption."""
    rates = default_rates(cfg, fits, shapes)
    examples = {t: 2 * s.val for t, s in sizes.items() if s is not None}
    if calibrate:
        got = calibration.calibrate(cfg, examples, log=log)
    elif earlier is not None:
        got = cost.rates_from_children(earlier[0], examples, f"MLflow: sweep {earlier[2]}")
    else:
        return rates
    rates.update({k: dataclasses.replace(r, fixed_eval=r.fixed_eval + _overhead(cfg, k[0], "tune_trial_s"))
                  for k, r in got.items() if k in rates})  # Tune's share outside the children's timings
    return rates


# ---------------------------------------------------------------------------------------------- printout


def _plan_lines(cfg: RunConfig, trials: list[Trial], sizes: dict) -> list[str]:
    """Cells, trials per method, each task's size and each model's steps."""
    per = {m: sum(t.method == m for t in trials) for m in cfg.methods}
    cells = len(cfg.models) * len(cfg.tasks) * len(cfg.languages)
    reps = sum(len(cfg.training.seeds) - 1 for m in cfg.methods if m != "steering") * cells
    out = [f"cells: {cells} = {len(cfg.models)} models x {len(cfg.tasks)} tasks x {len(cfg.languages)} languages",
           "trials per cell: " + ", ".join(f"{m} {n // cells}" for m, n in per.items())
           + f" -> {len(trials)} trials; replicates (seeds {cfg.training.seeds[1:]}): {reps}", "tasks:"]
    for t in cfg.tasks:
        s = sizes[t.name]
        out.append(f"  {t.name}: " + ("unknown size (hub data, not read offline): no steps, not in the estimate"
                                      if s is None else f"{s.n} examples per language ({s.note}): train {s.train}, "
                                      f"validation {s.val}, test {s.test}"))
    out.append("trained steps per trial (schedule: epochs x train / (batch_size x workers), max_steps):")
    for m in cfg.models:
        w = trial.train_workers(cfg, m.name)
        steps = {t.name: model_steps(cfg, m.name, sizes[t.name]) for t in cfg.tasks}
        total = sum((v or 0) * sum(tr.model == m.name and tr.task == k and tr.method != "steering" for tr in trials)
                    for k, v in steps.items())
        who = f"{w} worker(s)" if w else "trained in the trial process"
        out.append(f"  {m.name} ({who}, batch {cfg.training.batch_size} per worker): "
                   + ", ".join(f"{k} {v if v is not None else 'unknown'}" for k, v in steps.items())
                   + f"; {total} steps over its trained trials")
    return out


def _low_lines(cfg: RunConfig, trials: list[Trial], layers: dict, resolved: int, autos: int, sizes: dict, rates: dict,
               machine: Machine) -> list[str]:
    """With auto bands not resolved yet: the estimate if each repeats the first explicit band's layers (the
    other end of the range; on the synthetic world auto repeated band 0.25-0.5 in 51 of 54 cells)."""
    explicit = [band_label(b) for b in cfg.knobs.bands if b != "auto"]
    if resolved == autos or not explicit:
        return []
    low = {c: {"auto": bands[explicit[0]], **bands} for c, bands in layers.items()}
    est = estimate(cfg, grid.twins(trials, low)[0], sizes, rates, machine)
    return [f"if every auto band not resolved yet repeats band {explicit[0]}'s layers (its trials twins): total "
            f"{cost.hours(est.wall)} wall, {est.gpu_hours:.1f} GPU-h"]


def _twin_line(trials: list[Trial], run: list[Trial], resolved: int, autos: int) -> str:
    said = f"twins (a band resolving to another band's layers; they run once): {len(trials) - len(run)} of {len(trials)}"
    if autos:
        said += (f"; auto resolved from the cache in {resolved} of {autos} cells" +
                 ("" if resolved == autos else ", the others counted as distinct (their trials in full)"))
    return said


def _resource_lines(cfg: RunConfig, fits: dict, machine: Machine) -> list[str]:
    conc = concurrency(cfg, machine)
    out = [f"resources (cluster: {machine.cpus:g} CPUs, {machine.gpus:g} GPUs"
           f"{'' if cfg.sweep.cluster else ', this machine'}):"]
    for m in cfg.models:
        d = sweep.trial_demand(cfg, m.name)
        out.append(f"  {m.name}: {trial.train_workers(cfg, m.name)} Ray Train workers, {d['gpu']:g} GPU / "
                   f"{d['cpu']:g} CPU per trial, {conc[m.name]} trials at once")
    out.append("memory per GPU (memory.py: DeepSpeed's ZeRO-3 estimator + activations + evaluation actors):")
    out += [f"  {f.line()}" for f in fits.values()] or ["  no model trains on a GPU: nothing to fit"]
    return out


def _rates_lines(rates: dict) -> list[str]:
    out = ["rates (s): fixed train / fixed eval / load / step / forward / example  [source]"]
    for (m, t), r in rates.items():
        out.append(f"  {m}/{t}: {r.fixed_train:.3g} / {r.fixed_eval:.3g} / {r.load:.3g} / {r.step:.3g} / "
                   f"{r.forward:.3g} / {r.example:.3g}  [{r.source}]")
    if any(r.source.startswith("default: assumed GPU") for r in rates.values()):
        out.append("  assumed GPU figures: " + ", ".join(f"{k} {v:g}" for k, v in cost.GPU_ASSUMED.items()))
    return out + [f"  assumed: ci share {CI_SHARE:g} of a train split, {EXPERTS_SECONDS:g} s per experts.json, "
                  f"under ASHA {asha.SURVIVAL:g} of a cell's RA-MoE trials past each rung; "
                  "beyond the units' timings " + "; ".join(f"{k}: " + ", ".join(f"{n} {v:g}" for n, v in o.items())
                                                          for k, o in cost.OVERHEAD.items())]


def _measured_lines(cfg: RunConfig, earlier, est: cost.Estimate) -> list[str]:
    """The earlier sweep's measured phases next to this estimate's (the check of the cost model): totals over
    the phases it measured. ``cfg``: the planned config (``sources.planned``: its paths as the sweep resolves
    them, whose ``grid.config_hash`` the sweep's parent holds)."""
    if earlier is None:
        return []
    _, data, parent = earlier
    resumes = data.tags.get(tracking.RESUMES_TAG)
    if resumes:  # the phase times a sweep logs are those of its last run, since its start or its last --resume
        return [f"measured: sweep {parent} was continued {resumes} time(s) with --resume, so its logged phase times "
                "are those of its last run only: not compared with this estimate"]
    names = {"stages 1-2": "seconds_stages", "trials": "seconds_trials", "replicates": "seconds_replicates",
             "selection and test": "seconds_selection_and_test"}
    same = data.tags.get("ramoe.config_hash") == grid.config_hash(cfg)
    out = [f"measured (MLflow, sweep {parent}, {'the same settings' if same else 'other settings (config hash)'}; "
           "the checks and world building left out) vs this estimate:"]
    measured = estimated = 0.0
    for p in est.phases:
        got = data.metrics.get(names[p.name])
        measured, estimated = measured + (got or 0.0), estimated + (p.wall if got is not None else 0.0)
        out.append(f"  {p.name:<22} measured {cost.hours(got) if got is not None else '-':>10}   estimated "
                   f"{cost.hours(p.wall):>10}")
    if measured:
        out.append(f"  {'measured phases':<22} measured {cost.hours(measured):>10}   estimated "
                   f"{cost.hours(estimated):>10}   ({100 * (estimated - measured) / measured:+.0f} %)")
    return out


def dry_run(cfg: RunConfig, *, calibrate: bool = False, log=print) -> dict:
    """The dry run (module docstring): checks, plan, cache, rates, estimate; printed with ``log``."""
    trials, uri, shapes, fits = sweep.check_sweep(cfg)
    planned, missing = sources.planned(cfg)
    layers, resolved, autos = band_layers(cfg, planned, shapes, missing)
    run, twins = grid.twins(trials, layers)
    sizes = {t.name: task_size(cfg, planned, i) for i, t in enumerate(cfg.tasks)}
    machine = this_machine(cfg)
    earlier = earlier_sweep(cfg, uri)
    rates = choose_rates(cfg, sizes, fits, shapes, earlier, calibrate, log)
    est = estimate(cfg, run, sizes, rates, machine)
    base = estimate(baseline(cfg), trials, sizes, rates, machine, per_cell=False)
    lines = [f"dry run of sweep {cfg.name!r}: checks passed (grid, tracking {uri}, models and data, memory); "
             "nothing trained, built, downloaded or written" + (" (but --calibrate built and ran)" if calibrate else "")]
    lines += _plan_lines(cfg, trials, sizes)
    lines += [_twin_line(trials, run, resolved, autos)]
    lines += [f"cached stages ({planned.cache_dir}):"] + cached_stages(planned, missing)
    lines += [f"not built yet (not in the estimate): {x}" for x in missing.values()]
    lines += _resource_lines(cfg, fits, machine) + _rates_lines(rates)
    lines += ["estimate of this plan (phase, units, wall time, accelerator-hours):"] + est.lines()
    lines += ["without the savings (every model on the top-level resources, a Tune trial per steering setting, "
              "no early stopping):"]
    lines += base.lines() + _low_lines(cfg, trials, layers, resolved, autos, sizes, rates, machine)
    lines += _measured_lines(planned, earlier, est)  # the sweep's parent holds the hash of its resolved config
    for line in lines:
        log(line)
    return {"trials": trials, "twins": len(trials) - len(run), "sizes": sizes, "estimate": est, "baseline": base, "rates": rates, "fits": fits,
            "missing": missing, "lines": lines}
