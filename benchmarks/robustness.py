"""Hostile clients against aggregation rules on the CPU reference setting (docs/reliability.md).

    python benchmarks/robustness.py clean     # honest runs: each candidate rule x 3 seeds,
                                              # 10 clients per round (choosing the default)
    python benchmarks/robustness.py attacks   # attacks x rules x (1 hostile of 5, 2 of 10)
    python benchmarks/robustness.py report    # tables from the finished runs only
    python benchmarks/robustness.py score-totals   # honest clients' score sums against the
                                                   # default score rule's bound (no training)

Setting: configs/cifar10_cpu.toml (CIFAR-10, 100 clients, the small CNN, SSFL at density 0.1,
60 rounds), evaluated every 5 rounds. A single evaluation moves by several points from one
to the next in this setting, so every figure is the mean of the last three evaluations
(rounds 50, 55, 60: "settled accuracy"), compared with the same rule's honest run. The attack
table's "1 of 5" setting samples 5 clients per round; "2 of 10" the reference's 10. Every
attack comes from the simulator's ``[attack]`` section (``ssfl/attacks.py``): in every round
the first ``hostile_per_round`` sampled clients are hostile, so exactly that many hostile
replies reach the server each round.

Options: --seeds 0,1,2 (the attack table shows the first; attacks on the others go to the
table of more seeds)  --rules plain,clip,...
--attacks huge,...  --settings 5x1,10x2  --jobs 2  --runs-dir runs/robustness
--out benchmarks/results  --rounds N (a shorter trial; run names carry it).

Each run is an ``ssfl run`` process with one thread, under ``nice``; a run whose summary.json
exists is reused, so an interrupted sweep goes on where it stopped. A run that stops (the server
refuses to go on, for example because every update turned NaN) is a result, not a failure: it is
recorded with the round it stopped at and the accuracy of its last evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from comparison import CONFIG, run_jobs  # noqa: E402  (a sibling script, not a package)

#: aggregation rules as config overrides; "plain" is the paper's FedAvg (and its mean of
#: saliency scores). The update rules keep the paper's score mean, the score rules the plain
#: update mean: each changes one thing. The tables mark the rule that ssfl's defaults are
#: (``default_rule``).
PAPER_SCORES = "algorithm.ssfl.score_rule=mean"
PLAIN = ["federation.aggregator=mean", "federation.adaptive_clip=0"]
#: ssfl's own defaults, which configs/cifar10_cpu.toml (the paper's rules) overrides
DEFAULTS = ["federation.aggregator=auto", "federation.adaptive_clip=-1",
            "federation.byzantine=1", "algorithm.ssfl.score_rule=clipped"]
RULES: dict[str, list[str]] = {
    "plain": [*PLAIN, PAPER_SCORES],
    "default": DEFAULTS,
    # the default, tolerating two hostile clients per round (what 2 of 10 needs)
    "default_f2": [*DEFAULTS[:2], "federation.byzantine=2", *DEFAULTS[3:]],
    "clip": ["federation.aggregator=mean", "federation.adaptive_clip=2", PAPER_SCORES],
    "trimmed": ["federation.aggregator=trimmed_mean", "federation.adaptive_clip=0",
                PAPER_SCORES],
    "clip_trimmed": ["federation.aggregator=trimmed_mean", "federation.adaptive_clip=2",
                     PAPER_SCORES],
    "median": ["federation.aggregator=median", "federation.adaptive_clip=0", PAPER_SCORES],
    "krum": ["federation.aggregator=krum", "federation.adaptive_clip=0", PAPER_SCORES],
    "multi_krum": ["federation.aggregator=multi_krum", "federation.adaptive_clip=0",
                   PAPER_SCORES],
    # FLTrust: the server's own change on a clean sample sets each round's direction and step
    "fltrust": ["federation.aggregator=fltrust", "federation.adaptive_clip=0",
                "algorithm.ssfl.score_rule=clipped"],
    "scores_normalised": [*PLAIN, "algorithm.ssfl.score_rule=normalised"],
    "scores_trimmed": [*PLAIN, "algorithm.ssfl.score_rule=trimmed_mean"],
    "scores_median": [*PLAIN, "algorithm.ssfl.score_rule=median"],
}
#: the rules of the mask round, against the poisoned-scores attack
SCORE_RULES = ["plain", "default", "scores_normalised", "scores_trimmed", "scores_median"]
#: what each rule's label means, for the tables
RULE_TEXT = {
    "plain": "FedAvg (mean, no clipping) and the mean of scores: the paper's",
    "default": "ssfl's default: each change clipped to 2 x the round's median change norm, "
               "then multi-Krum (f = 1); scores: a client's sum clipped to 2 x the median "
               "client's, then the mean",
    "default_f2": "the default with federation.byzantine = 2 (multi-Krum leaves two out)",
    "clip": "mean after adaptive clipping (2 x the round's median change norm)",
    "trimmed": "trimmed mean (10% from each end, at least one)",
    "clip_trimmed": "trimmed mean after adaptive clipping",
    "median": "coordinate-wise median",
    "krum": "Krum (f = hostile per round)",
    "multi_krum": "multi-Krum (f = hostile per round)",
    "fltrust": "FLTrust: each change scaled to the server's own change on a clean sample of "
               "a client's size and weighted by its cosine with it (negative: 0); side "
               "information no other rule has; the default's score rule",
    "scores_normalised": "FedAvg; scores normalised per client before the mean",
    "scores_trimmed": "FedAvg; trimmed mean of scores",
    "scores_median": "FedAvg; median of scores",
}
#: the columns of the attack table: update rules
UPDATE_RULES = ["plain", "default", "default_f2", "clip", "trimmed", "clip_trimmed", "median",
                "krum", "multi_krum", "fltrust"]
ATTACKS = ["huge", "boost", "sign_flip", "zeros", "inflate_samples", "poison_scores", "replay"]
#: (clients per round, hostile clients per round)
SETTINGS = {"5x1": (5, 1), "10x2": (10, 2)}
#: the seeds the report looks for (the first is the attack table's; the others go to the
#: table of more seeds)
REPORT_SEEDS = range(5)
CLEAN_SETTING = "10x0"
#: evaluations: every 5 rounds; a figure is the mean of the last SETTLE of them
EVAL_EVERY = 5
SETTLE = 3
#: what ``ssfl run`` prints when the server stops a run (ssfl/cli.py)
STOPPED = "ssfl run: the run stopped:"


def default_rule() -> str | None:
    """The rule whose overrides are ssfl's own defaults (None: none is, as after a change of
    the defaults that this script has not followed)."""
    from ssfl.algorithms.ssfl import SaliencySettings
    from ssfl.config import FederationSection

    fed = FederationSection()
    own = [f"federation.aggregator={fed.aggregator}",
           f"federation.adaptive_clip={fed.adaptive_clip:g}",
           f"federation.byzantine={fed.byzantine}",
           f"algorithm.ssfl.score_rule={SaliencySettings().score_rule}"]
    return "default" if own == DEFAULTS else None


def label(rule: str) -> str:
    """A column's name: "default" is marked stale once ssfl's defaults moved on from it."""
    return "default (stale)" if rule == "default" and default_rule() is None else rule


@dataclass(frozen=True)
class Job:
    rule: str
    attack: str  # "none": an honest run
    setting: str  # "<clients per round>x<hostile per round>"
    seed: int
    rounds: int | None = None  # None: the config's

    @property
    def name(self) -> str:
        rounds = "" if self.rounds is None else f"-r{self.rounds}"
        return f"{self.rule}-{self.attack}-{self.setting}-s{self.seed}{rounds}"

    @property
    def per_round(self) -> tuple[int, int]:
        clients, hostile = self.setting.split("x")
        return int(clients), int(hostile)

    def overrides(self) -> list[str]:
        clients, hostile = self.per_round
        out = [*RULES[self.rule], f"federation.clients_per_round={clients}",
               f"run.seed={self.seed}", f'run.name="{self.name}"',
               f"run.eval_every={EVAL_EVERY}"]
        if self.rule in ("krum", "multi_krum"):
            # Krum needs more than f + 2 replies; f is the number of hostile clients per round
            f = max(hostile, 1)
            out += [f"federation.byzantine={f}", f"federation.min_replies={f + 3}"]
        if self.attack != "none":
            out += [f"attack.kind={self.attack}", f"attack.hostile_per_round={hostile}"]
        if self.rounds is not None:
            out.append(f"run.rounds={self.rounds}")
        return out


def clean_jobs(rules: Sequence[str], seeds: Sequence[int], rounds: int | None) -> list[Job]:
    return [Job(rule, "none", CLEAN_SETTING, seed, rounds) for seed in seeds for rule in rules]


def attack_jobs(rules: Sequence[str], attacks: Sequence[str], seed: int,
                rounds: int | None, settings: Sequence[str] = tuple(SETTINGS)) -> list[Job]:
    """Per setting (cheap first), per rule in the order given (a partly finished sweep has
    whole columns): its honest baseline, then every attack. The score rules meet only the
    attack on scores."""
    jobs = []
    for setting in settings:
        clients = SETTINGS[setting][0]
        for rule in rules:
            jobs.append(Job(rule, "none", f"{clients}x0", seed, rounds))
            jobs += [Job(rule, attack, setting, seed, rounds) for attack in attacks
                     if rule in UPDATE_RULES or attack == "poison_scores"]
    return jobs


# ------------------------------------------------------------------------------------ results


def run_row(job: Job, folder: Path) -> dict[str, Any] | None:
    """One run's outcome from its folder: completed (summary.json) or stopped (its log and
    metrics); None while it has not run."""
    metrics_path = folder / "metrics.jsonl"
    summary_path = folder / "summary.json"
    row: dict[str, Any] = {"name": job.name, "rule": job.rule, "attack": job.attack,
                           "setting": job.setting, "seed": job.seed, "rounds": job.rounds}
    completed = summary_path.exists()
    log_path = folder.parent / f"{job.name}.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    if "Traceback" in log:
        raise SystemExit(f"{job.name} crashed with a traceback: see {log_path}")
    if not completed and (STOPPED not in log or not metrics_path.exists()):
        return None  # not run yet, or interrupted (it resumes from its checkpoint)
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    evaluated = [m["accuracy"] for m in metrics if m.get("accuracy") is not None]
    hostile = job.per_round[1] if job.attack not in ("none", "poison_scores") else 0
    if hostile:
        # The hostile replies the rule left out: the first ``hostile`` clients of each round
        # are the hostile ones (ssfl/attacks.py); the metrics row names whom multi-Krum left
        # out and whose update was a copy of another's (counted once).
        def dropped(m: dict[str, Any]) -> set[int]:
            diagnostics = m.get("diagnostics", {})
            return set(diagnostics.get("left_out", [])) | set(diagnostics.get("repeats", []))

        row["hostile_left_out"] = sum(len(set(m["clients"][:hostile]) & dropped(m))
                                      for m in metrics)
        row["hostile_replies"] = hostile * len(metrics)
    return {**row, "completed": completed,
            "final_accuracy": evaluated[-1] if evaluated else None,
            "settled_accuracy": (sum(evaluated[-SETTLE:]) / len(evaluated[-SETTLE:])
                                 if evaluated else None),
            "stopped_at": None if completed else len(metrics) + 1,
            "reason": "" if completed else log.strip().splitlines()[-1][:300]}


def collect(jobs: Sequence[Job], runs_dir: Path,
            recorded: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        row = run_row(job, runs_dir / job.name) or recorded.get(job.name)
        if row is not None:
            rows.append(row)
    return rows


def cell(row: dict[str, Any] | None, clean: float | None) -> str:
    if row is None:
        return "..."
    acc = row["settled_accuracy"]
    text = "-" if acc is None else f"{acc * 100:.1f}"
    if clean is not None and acc is not None:
        text += f" ({(acc - clean) * 100:+.1f})"
    if row.get("hostile_left_out"):
        text += f" [{row['hostile_left_out']}/{row['hostile_replies']}]"
    if not row["completed"]:
        text += f" stopped r{row['stopped_at']}"
    return text


def clean_table(rows: Sequence[dict[str, Any]], rules: Sequence[str],
                setting: str = CLEAN_SETTING, least_seeds: int = 1) -> str:
    lines = ["| rule | settled accuracy % (mean +- std over seeds) | seeds |", "|---|---|---|"]
    for rule in rules:
        accs = [r["settled_accuracy"] * 100 for r in rows
                if r["rule"] == rule and r["attack"] == "none" and r["setting"] == setting]
        if len(accs) >= least_seeds:
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {label(rule)}: {RULE_TEXT[rule]} | {statistics.mean(accs):.1f} +- "
                         f"{std:.1f} ({', '.join(f'{a:.1f}' for a in accs)}) | {len(accs)} |")
    return "\n".join(lines)


def attack_table(rows: Sequence[dict[str, Any]], rules: Sequence[str], setting: str,
                 attacks: Sequence[str]) -> str:
    clients, hostile = SETTINGS[setting]
    by = {(r["rule"], r["attack"], r["setting"]): r for r in rows}
    rules = [r for r in rules if r in UPDATE_RULES]
    lines = [f"| attack ({hostile} hostile of {clients} per round) | "
             + " | ".join(map(label, rules)) + " |", "|---" * (len(rules) + 1) + "|"]
    clean = {rule: by.get((rule, "none", f"{clients}x0")) for rule in rules}
    lines.append("| none (honest run) | " + " | ".join(
        cell(clean[rule], None) for rule in rules) + " |")
    worst: dict[str, list[float]] = {rule: [] for rule in rules}
    for attack in attacks:
        cells = []
        for rule in rules:
            base = clean[rule]["settled_accuracy"] if clean[rule] else None
            row = by.get((rule, attack, setting))
            cells.append(cell(row, base))
            if row and base is not None and row["settled_accuracy"] is not None:
                worst[rule].append((row["settled_accuracy"] - base) * 100)
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines.append("| largest loss (points; attacks run) | " + " | ".join(
        f"{-min(worst[r]):.1f} ({len(worst[r])})" if worst[r] else "..." for r in rules) + " |")
    return "\n".join(lines)


def attack_changes(rows: Sequence[dict[str, Any]], rules: Sequence[str], setting: str,
                   attacks: Sequence[str]) -> list[list[float | None]]:
    """Per attack (rows) and rule (columns): the settled accuracy's change in points against
    the rule's honest run of the same size (None: a run not done yet)."""
    clients = SETTINGS[setting][0]
    by = {(r["rule"], r["attack"], r["setting"]): r for r in rows}
    out = []
    for attack in attacks:
        line: list[float | None] = []
        for rule in rules:
            clean, hit = by.get((rule, "none", f"{clients}x0")), by.get((rule, attack, setting))
            line.append(None if clean is None or hit is None or hit["settled_accuracy"] is None
                        else (hit["settled_accuracy"] - clean["settled_accuracy"]) * 100)
        out.append(line)
    return out


def attack_figure(rows: Sequence[dict[str, Any]], rules: Sequence[str],
                  attacks: Sequence[str], path: Path) -> None:
    """The attack tables as heat maps, one panel per setting: each cell the change in points
    against the rule's honest run (green: no loss; red: 20 points or more), blank where the
    run has not been done."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rules = [r for r in rules if r in UPDATE_RULES]
    fig = Figure(figsize=(1.0 + 0.95 * len(rules), 1.2 + 2.0 * len(SETTINGS)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(SETTINGS), 1, squeeze=False)[:, 0]
    image = None
    for ax, setting in zip(axes, SETTINGS):
        clients, hostile = SETTINGS[setting]
        changes = attack_changes(rows, rules, setting, attacks)
        grid = [[float("nan") if v is None else v for v in line] for line in changes]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=-20, vmax=20, aspect="auto")
        for i, line in enumerate(changes):
            for j, value in enumerate(line):
                ax.text(j, i, "..." if value is None else f"{value:+.1f}", ha="center",
                        va="center", fontsize=7, color="0.1" if value is None or
                        abs(value) < 14 else "white")
        ax.set_xticks(range(len(rules)), [label(r) for r in rules], fontsize=8, rotation=20)
        ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
        ax.set_title(f"{hostile} hostile client{'s' if hostile > 1 else ''} of {clients} per "
                     "round", fontsize="medium")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8,
                     label="change in settled accuracy (points)")
    fig.suptitle("Attacks against aggregation rules (CPU reference, 60 rounds, seed 0)")
    fig.savefig(path, dpi=110)


def score_table(rows: Sequence[dict[str, Any]], rules: Sequence[str]) -> str:
    by = {(r["rule"], r["attack"], r["setting"]): r for r in rows}
    rules = [r for r in SCORE_RULES if r in rules]
    lines = ["| setting | " + " | ".join(map(label, rules)) + " |",
             "|---" * (len(rules) + 1) + "|"]
    for setting, (clients, hostile) in SETTINGS.items():
        cells = []
        for rule in rules:
            clean = by.get((rule, "none", f"{clients}x0"))
            cells.append(cell(by.get((rule, "poison_scores", setting)),
                              clean["settled_accuracy"] if clean else None))
        lines.append(f"| {hostile} of 100 clients poison their scores ({clients} per round "
                     f"later) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(clean: Sequence[dict[str, Any]], attacked: Sequence[dict[str, Any]]) -> str:
    """The attacked cells run on more than one seed: each seed's change against the same
    rule's honest run of that seed (same clients per round), and their mean. One seed's change
    at 5 per round moves by about as much as the honest runs' spread (2 to 3 points)."""
    honest = {(r["rule"], r["setting"], r["seed"]): r["settled_accuracy"] for r in clean}
    changes: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in attacked:
        base = honest.get((r["rule"], f"{r['setting'].split('x')[0]}x0", r["seed"]))
        if base is not None and r["settled_accuracy"] is not None:
            changes.setdefault((r["rule"], r["attack"], r["setting"]), {})[r["seed"]] = (
                (r["settled_accuracy"] - base) * 100)
    lines = ["| rule | attack | setting | change per seed (points) | mean +- std |",
             "|---|---|---|---|---|"]
    for (rule, attack, setting), by_seed in sorted(changes.items()):
        if len(by_seed) < 2:
            continue
        values = [by_seed[s] for s in sorted(by_seed)]
        lines.append(f"| {label(rule)} | {attack} | {setting} | "
                     + ", ".join(f"s{s}: {by_seed[s]:+.1f}" for s in sorted(by_seed))
                     + f" | {statistics.mean(values):+.1f} +- {statistics.stdev(values):.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def report(clean: Sequence[dict[str, Any]], attacked: Sequence[dict[str, Any]],
           rules: Sequence[str], attacks: Sequence[str], out: Path, rounds: int | None,
           more_seeds: Sequence[dict[str, Any]] = ()) -> None:
    length = "the config's rounds" if rounds is None else f"{rounds} rounds"
    text = ["# Robustness on the CPU reference setting", "",
            "Written by `python benchmarks/robustness.py`; global accuracy in %, the mean of "
            "the last three evaluations (rounds 50, 55, 60 of 60).", "",
            "## Honest runs (60 rounds, 10 clients per round)", "", clean_table(clean, rules),
            "", "## Honest runs (60 rounds, 5 clients per round; rules run on more than one "
            "seed)", "", clean_table(clean, rules, "5x0", least_seeds=2), ""]
    for setting in SETTINGS:
        text += [f"## Attacks, setting {setting} ({length}, seed {attacked[0]['seed']})"
                 if attacked else f"## Attacks, setting {setting}", "",
                 "In brackets: the change against the same rule's honest run of the same "
                 "length; in square brackets, for the rules that leave updates out: how many of "
                 "the hostile replies they left out; 'stopped rN': the server stopped the run "
                 "in round N (no valid update was left).", "",
                 attack_table(attacked, rules, setting, attacks), ""]
    text += ["## The mask round: poisoned scores against score rules", "",
             score_table(attacked, rules), ""]
    seeded = seeds_table(clean, [*attacked, *more_seeds])
    if seeded:
        text += ["## Attacks on more seeds", "",
                 "Each seed's change against the same rule's honest run of that seed: a "
                 "single seed's change at 5 clients per round moves by about as much as the "
                 "honest runs' spread.", "", seeded, ""]
    attack_figure(attacked, rules, attacks, out / "robustness_attacks.png")
    text += ["![The attack tables as heat maps](robustness_attacks.png)", ""]
    text += ["Rules:", ""] + [f"- `{r}`: {RULE_TEXT[r]}" for r in rules]
    (out / "robustness.md").write_text("\n".join(text) + "\n")
    write_into_doc("\n".join(line.replace("## ", "#### ", 1) if line.startswith("## ") else
                             line.replace("](robustness_attacks.png)",
                                          "](../benchmarks/results/robustness_attacks.png)")
                             for line in text[2:]))
    (out / "robustness.json").write_text(json.dumps(
        {"attack_rounds": rounds, "runs": [*clean, *attacked, *more_seeds]}, indent=1) + "\n")
    print("\n".join(text))
    print(f"wrote {out / 'robustness.md'} and .json")


#: the tables' place in docs/reliability.md, rewritten by every report
DOC = HERE.parent / "docs" / "reliability.md"
DOC_START = "<!-- robustness tables: written by benchmarks/robustness.py -->"
DOC_END = "<!-- end of robustness tables -->"


def write_into_doc(tables: str, doc: Path = DOC) -> None:
    text = doc.read_text()
    if DOC_START not in text or DOC_END not in text:
        raise SystemExit(f"{doc} has no {DOC_START!r} ... {DOC_END!r} block to fill")
    head, rest = text.split(DOC_START, 1)
    tail = rest.split(DOC_END, 1)[1]
    doc.write_text(f"{head}{DOC_START}\n{tables.strip()}\n{DOC_END}{tail}")


def score_totals(config_path: Path, seeds: Sequence[int], out: Path) -> None:
    """Each honest client's score sum over the median client's, in the mask round of the CPU
    reference (every client scores, density 0.1): how far below the default score rule's bound
    (``SCORE_CLIP`` x the median) honest clients stay. Nothing is trained."""
    from lean_mask import mask_round

    from ssfl.algorithms.robust import SCORE_CLIP
    from ssfl.config import load_config
    from ssfl.run.experiment import prepare

    rows = []
    for seed in seeds:
        config = load_config(config_path, [f"run.seed={seed}", "algorithm.ssfl.score_rule=clipped"])
        run, _ = mask_round(prepare(config, with_test=False), config)
        totals = list(run.algorithm.score_totals.values())
        median = statistics.median(totals)
        ratios = sorted(t / median for t in totals)
        rows.append({"seed": seed, "clients": len(ratios), "min_ratio": round(ratios[0], 3),
                     "max_ratio": round(ratios[-1], 3), "bound": SCORE_CLIP,
                     "scaled": sum(r > SCORE_CLIP for r in ratios)})
        print(f"seed {seed}: {len(ratios)} clients, score sums {ratios[0]:.2f} to "
              f"{ratios[-1]:.2f} x the median (bound {SCORE_CLIP:g}); "
              f"{rows[-1]['scaled']} scaled")
    out.mkdir(parents=True, exist_ok=True)
    (out / "score_totals.json").write_text(json.dumps({"config": config_path.name,
                                                       "rows": rows}, indent=1) + "\n")
    print(f"wrote {out / 'score_totals.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", choices=["clean", "attacks", "report", "score-totals"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/robustness"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()
    rules = args.rules.split(",")
    attacks = [a for a in args.attacks.split(",") if a]  # "": the honest runs only
    for name, known, given in (("rule", RULES, rules), ("attack", ATTACKS, attacks)):
        unknown = [g for g in given if g not in known]
        if unknown:
            raise SystemExit(f"unknown {name} {unknown}; choose from {list(known)}")
    settings = args.settings.split(",")
    if not set(settings) <= set(SETTINGS):
        raise SystemExit(f"unknown setting in {settings}; choose from {list(SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.sweep == "score-totals":
        score_totals(args.config, seeds, args.out)
        return
    recorded_path = args.out / "robustness.json"
    # Rows without a settled accuracy are from the dropped 30-round protocol: not this table's.
    recorded = ({r["name"]: r for r in json.loads(recorded_path.read_text())["runs"]
                 if "settled_accuracy" in r} if recorded_path.exists() else {})
    jobs = clean_jobs(rules, seeds, None)
    if args.sweep == "attacks":
        jobs = [job for seed in seeds
                for job in attack_jobs(rules, attacks, seed, args.rounds, settings)]
    if args.sweep != "report":
        # A stopped run is an outcome (it has metrics and a log), not work left to do.
        done = {j.name for j in jobs if run_row(j, args.runs_dir / j.name) is not None}
        run_jobs(jobs, args.runs_dir, args.jobs, [], {**recorded, **dict.fromkeys(done)},
                 args.config)
    clean = collect([*clean_jobs(list(RULES), REPORT_SEEDS, None),
                     *(Job(rule, "none", "5x0", seed) for seed in REPORT_SEEDS
                       for rule in RULES)],
                    args.runs_dir, recorded)
    attacked = collect(attack_jobs(list(RULES), ATTACKS, seeds[0], args.rounds), args.runs_dir,
                       recorded)
    more_seeds = collect([job for seed in REPORT_SEEDS[1:] for job in
                          attack_jobs(list(RULES), ATTACKS, seed, args.rounds)
                          if job.attack != "none"], args.runs_dir, recorded)
    args.out.mkdir(parents=True, exist_ok=True)
    report(clean, attacked, rules, attacks, args.out, args.rounds, more_seeds)


if __name__ == "__main__":
    main()
