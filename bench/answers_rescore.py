"""What the new extractor changes: old and new ``mapd.answers`` side by side on real pipeline outputs.

    python bench/answers_rescore.py --run runs/default          # a run folder (e.g. the embedded default)
    python bench/answers_rescore.py --run A --run B --show      # several folders; print every changed text
    python bench/answers_rescore.py --no-reference --run A      # skip the reference data
    python bench/answers_rescore.py --predictions runs/reproduce-svamp/method/eval/predictions.jsonl

The OLD extractor is this repository's ``src/mapd/answers.py`` at ``--old`` (default 60914a2, the commit
before the cut-off work), read with ``git show`` into a temporary file and imported as
``mapd_answers_old``; the NEW one is the installed ``mapd.answers``. Each module grades with its own
``is_correct``.

For a run folder, every text that an extractor reads is rescored: eval_before/eval_after predictions
(accuracy, status, which answers changed), mistakes.jsonl (which recorded mistakes would not be
mistakes) and rationales.jsonl (their ``answer`` and acceptance against the gold answer, as the
report's gold check counts it). The new extractor is told whether each text was cut off, from, in
order: the record's ``cut_off`` field; the run's call cache (a teacher call's ``finish_reason``,
matched on teacher and text); the text's token count under the model that wrote it, re-encoded
(``>=`` the token limit: cut off). Without any of these it judges from the text (``complete=None``).
The "new, from text" columns always judge from the text.

The reference data (the folder $MAPD_REFERENCE_DATA names, see bench/_common.py; what
docs/reproduction.md trains on) is imported with ``mapd import-reference`` into a temporary folder:
the 387 SVAMP and 825 StrategyQA recorded student "mistakes" of Llama-2-7B and the 1,161 SVAMP teacher
rationales. They carry no cut-off flag, so the new extractor judges from the text. The rationales'
gold check also shows the reference's own rule (the last number).

``--predictions`` rescores loose predictions.jsonl files the same way (``cut_off`` from each record,
else judged from the text), e.g. each variant of bench/reproduce_svamp.py. Last, the two labelled
sets (tests/data/answers_cutoff.jsonl, tests/data/labelled_answers.jsonl): agreement with a person,
old against new, and on the cut-off set the accuracy against the gold. The figures are in
docs/answers.md ("What the new extractor changes").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench._common

from bench._common import DataNotFound, reference_data, reference_rule  # noqa: E402

from mapd import answers as new  # noqa: E402

OLD_REV = "60914a2"
REFERENCE_FILES = {
    "svamp": ("Llama-2-7b-chat-hf_svamp_false_round0.json", "Llama-2-7b-chat-hf_svamp_feedback_round0.json",
              "Llama-2-7b-chat-hf_svamp_rationale_round0.json"),
    "strategyqa": ("Llama-2-7b-chat-hf_strategyQA_false_round0.json", None, None),
}


# ------------------------------------------------------------------------------ the two extractors


def load_old(rev: str):
    """``src/mapd/answers.py`` at ``rev``, imported under the name ``mapd_answers_old``."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/mapd/answers.py"],
                            capture_output=True, text=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="answers_old_"))
    path = folder / "mapd_answers_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mapd_answers_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mapd_answers_old"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Grader:
    def __init__(self, old):
        self.old = old

    def old_(self, text: str | None, kind: str, options=None) -> tuple[str | None, str, bool]:
        """(answer, status, strict) of the old extractor; status "failed" for a failed call (no text)."""
        if text is None:
            return None, "failed", False
        e = self.old.extract(text, kind, options)
        return e.answer, e.status, e.strict

    @staticmethod
    def new_(text: str | None, kind: str, options=None, complete: bool | None = None):
        """(answer, status, strict) of the new extractor, told ``complete`` (None: it judges from the text)."""
        if text is None:
            return None, "failed", False
        e = new.extract(text, kind, options, complete=complete)
        return e.answer, e.status, e.strict

    def old_right(self, answer, gold, kind) -> bool:
        return answer is not None and bool(self.old.is_correct(answer, gold, kind))

    @staticmethod
    def new_right(answer, gold, kind) -> bool:
        return answer is not None and bool(new.is_correct(answer, gold, kind))


def pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}% ({k})" if n else "n/a"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def shown(answer: str | None, status: str) -> str:
    return answer if status == "ok" else status


def short(text: str, n: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else "..." + text[-n:]


# ------------------------------------------------------------------------------ cut-off sources


class CutOff:
    """Whether a text of a run was cut off at its token limit: record, call cache, token count."""

    def __init__(self, run: Path, config: dict, use_tokenizer: bool = True):
        self.run, self.config, self.use_tokenizer = run, config, use_tokenizer
        self.cache: dict[tuple[str, str], str | None] = {}
        cache = run / "cache.sqlite"
        if cache.is_file():
            db = sqlite3.connect(f"file:{cache}?mode=ro", uri=True)  # read only: the run's cache is not ours
            try:
                columns = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
                if "finish_reason" in columns:
                    for teacher, text, reason in db.execute(
                            "SELECT teacher, text, finish_reason FROM calls WHERE text IS NOT NULL"):
                        self.cache[(teacher, text)] = reason
            finally:
                db.close()
        self.tokenizers: dict[str, object] = {}
        self.sources: Counter = Counter()
        self.recorded_vs_count: Counter = Counter()

    def _tokenizer(self, model: str):
        if model not in self.tokenizers:
            try:
                from transformers import AutoTokenizer

                from mapd.models import resolve_model

                folder, gguf = resolve_model(model)
                kwargs = {"gguf_file": gguf} if gguf else {}
                self.tokenizers[model] = AutoTokenizer.from_pretrained(folder, **kwargs)
            except Exception as exc:  # noqa: BLE001 - no tokenizer: the extractor judges from the text
                print(f"  (no tokenizer for {model}: {exc}; judging from the text)", file=sys.stderr)
                self.tokenizers[model] = None
        return self.tokenizers[model]

    def tokens(self, model: str, text: str) -> int | None:
        tokenizer = self._tokenizer(model) if self.use_tokenizer else None
        return None if tokenizer is None else len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def of(self, record: dict, text: str | None, *, model: str, limit: int, teacher: str | None = None) -> bool | None:
        if text is None:
            return None
        if record.get("cut_off") is not None:
            self.sources["record"] += 1
            count = self.tokens(model, text) if model else None
            if count is not None:  # how far the token count alone could be trusted
                self.recorded_vs_count[(count >= limit) == record["cut_off"]] += 1
            return bool(record["cut_off"])
        if teacher is not None and (teacher, text) in self.cache and self.cache[(teacher, text)]:
            self.sources["call cache"] += 1
            return self.cache[(teacher, text)] == "length"
        count = self.tokens(model, text)
        if count is not None:
            self.sources["token count"] += 1
            return count >= limit
        self.sources["unknown"] += 1
        return None

    def check_token_counts(self) -> str | None:
        """How often the re-encoded token count agrees with the cache's finish_reason (teacher texts)."""
        teachers = {t["name"]: t for t in self.config.get("teachers", [])}
        agree = n = 0
        for (teacher, text), reason in self.cache.items():
            spec = teachers.get(teacher)
            if not spec or not reason or spec.get("provider", "local") != "local":
                continue
            count = self.tokens(spec["model"], text)
            if count is None:
                return None
            n += 1
            agree += (count >= spec["max_tokens"]) == (reason == "length")
        return f"{agree} / {n}" if n else None


# ------------------------------------------------------------------------------ a run folder


def read_jsonl(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def options_by_id(config: dict, split: str, kind: str) -> dict[str, list[str]]:
    if kind != "choice":
        return {}
    from mapd.config import TaskConfig
    from mapd.tasks import get_task

    task = TaskConfig(**config["task"])
    return {e.id: e.options for e in get_task(task).load(split, None)}


def transitions(rows: list[tuple[str, str]]) -> str:
    """Counts of "old -> new" (answer or status), only where they differ."""
    kinds = Counter()
    for before, after in rows:
        if before == after:
            continue
        b = "an answer" if before not in ("unparsed", "truncated", "failed") else before
        a = "an answer" if after not in ("unparsed", "truncated", "failed") else after
        kinds[f"{b} -> {'another answer' if a == b == 'an answer' else a}"] += 1
    return ", ".join(f"{k}: {v}" for k, v in kinds.most_common()) or "none"


PREDICTION_HEADERS = ["predictions", "n", "cut off", "accuracy as recorded", "old", "new", "new, from text",
                      "old: no answer", "new: unparsed / truncated", "answers that changed (old -> new)"]


def rescore_predictions(name: str, records: list[dict], kind: str, options: dict, grader: Grader, *, cut,
                        show: bool) -> tuple[dict, list]:
    """Accuracy of one predictions.jsonl as recorded, old, new (told ``cut(record)``) and new from the text."""
    r = Counter()
    changes, moved = [], []
    for p in records:
        opts = options.get(p["id"])
        o_ans, o_status, _ = grader.old_(p["output"], kind, opts)
        c = cut(p)
        n_ans, n_status, _ = grader.new_(p["output"], kind, opts, None if c is None else not c)
        t_ans, t_status, _ = grader.new_(p["output"], kind, opts, None)
        r["n"] += 1
        r["recorded"] += bool(p.get("correct"))
        r["old"] += grader.old_right(o_ans, p["gold"], kind)
        r["new"] += grader.new_right(n_ans, p["gold"], kind)
        r["text"] += grader.new_right(t_ans, p["gold"], kind)
        r["cut_off"] += bool(c)
        r["cut_off_unknown"] += c is None
        r["old_none"] += o_status != "ok"
        r["new_unparsed"] += n_status == "unparsed"
        r["new_truncated"] += n_status == "truncated"
        moved.append((shown(o_ans, o_status), shown(n_ans, n_status)))
        if shown(o_ans, o_status) != shown(n_ans, n_status):
            changes.append(f"    {name} {p['id']}: {shown(o_ans, o_status)} -> {shown(n_ans, n_status)} "
                           f"(gold {p['gold']}, cut off {c}): {short(p['output'])}")
    if show:
        print("\n".join(changes))
    cut_cell = pct(r["cut_off"], r["n"]) + (f", {r['cut_off_unknown']} unknown" if r["cut_off_unknown"] else "")
    row = [name, r["n"], cut_cell, pct(r["recorded"], r["n"]), pct(r["old"], r["n"]),
           pct(r["new"], r["n"]), pct(r["text"], r["n"]), r["old_none"],
           f"{r['new_unparsed']} / {r['new_truncated']}", transitions(moved)]
    return dict(r, changes=transitions(moved)), row


def rescore_files(paths: list[Path], grader: Grader, *, show: bool) -> dict:
    """Loose predictions.jsonl files (e.g. bench/reproduce_svamp.py's <variant>/eval/predictions.jsonl):
    cut-off from each record's ``cut_off``, else judged from the text; choice options are not known here."""
    from mapd.report import answer_kind

    out, rows = {}, []
    print("\n## Predictions files")
    for path in paths:
        records = read_jsonl(path)
        kind = answer_kind(None, [p["gold"] for p in records])
        r, row = rescore_predictions(str(path), records, kind, {}, grader, show=show, cut=lambda p: p.get("cut_off"))
        out[str(path)] = r
        rows.append(row)
    print(table(PREDICTION_HEADERS, rows))
    return out


def rescore_run(run: Path, grader: Grader, *, use_tokenizer: bool, show: bool) -> dict:
    from mapd.report import answer_kind

    manifest = json.loads((run / "manifest.json").read_text())
    config = manifest["config"]
    student = config["student"]
    teachers = {t["name"]: t for t in config.get("teachers", [])}
    cut = CutOff(run, config, use_tokenizer)
    out: dict = {"run": str(run), "finished": manifest.get("finished"), "rounds": []}
    print(f"\n## Run {run} (finished {manifest.get('finished')}, task {config['task']['name']}, "
          f"student max_new_tokens {student['max_new_tokens']})")
    for round_dir in sorted(run.glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        mistakes = read_jsonl(round_dir / "mistakes.jsonl") or []
        rationales = read_jsonl(round_dir / "rationales.jsonl") or []
        golds = {m["id"]: m["gold"] for m in mistakes}
        preds = {name: read_jsonl(round_dir / name / "predictions.jsonl") for name in ("eval_before", "eval_after")}
        every_gold = list(golds.values()) + [p["gold"] for ps in preds.values() if ps for p in ps]
        kind = answer_kind(manifest, every_gold)
        result: dict = {"round": round_dir.name, "kind": kind}
        print(f"\n### {round_dir.name} (answer kind {kind})")

        # --- evaluations
        rows = []
        for name, records in preds.items():
            if records is None:
                continue
            model = student["model"] if name == "eval_before" else str(round_dir / "model")
            options = options_by_id(config, config["task"].get("test_split", "test"), kind)
            r, row = rescore_predictions(name, records, kind, options, grader, show=show,
                                         cut=lambda p: cut.of(p, p["output"], model=model,
                                                              limit=student["max_new_tokens"]))
            result[name] = r
            rows.append(row)
        if rows:
            print(table(PREDICTION_HEADERS, rows))

        # --- mistakes
        if mistakes:
            m = Counter()
            moved, lines = [], []
            for x in mistakes:
                o_ans, o_status, _ = grader.old_(x["output"], kind)
                c = cut.of(x, x["output"], model=student["model"], limit=student["max_new_tokens"])
                n_ans, n_status, _ = grader.new_(x["output"], kind, None, None if c is None else not c)
                m["n"] += 1
                m["cut_off"] += bool(c)
                m["old_mistake"] += not grader.old_right(o_ans, x["gold"], kind)
                m["new_mistake"] += not grader.new_right(n_ans, x["gold"], kind)
                m[f"recorded {x.get('status', 'wrong')}"] += 1
                m[f"old {'wrong' if o_status == 'ok' else o_status}"] += 1
                if n_status != "ok":
                    m[f"new {n_status}"] += 1
                else:
                    m["new right" if grader.new_right(n_ans, x["gold"], kind) else "new wrong"] += 1
                moved.append((shown(o_ans, o_status), shown(n_ans, n_status)))
                if shown(o_ans, o_status) != shown(n_ans, n_status):
                    lines.append(f"    mistake {x['id']}: {shown(o_ans, o_status)} -> {shown(n_ans, n_status)} "
                                 f"(gold {x['gold']}, cut off {c}): {short(x['output'])}")
            result["mistakes"] = dict(m, changes=transitions(moved))
            recorded = ", ".join(f"{k}: {v}" for k, v in sorted(m.items()) if k.startswith("recorded"))
            print(f"\nmistakes.jsonl: {m['n']} recorded ({recorded}); cut off {m['cut_off']}; still mistakes: "
                  f"old {m['old_mistake']}, new {m['new_mistake']}; old: {m['old wrong']} wrong, "
                  f"{m['old unparsed']} unparsed; new: {m['new wrong']} wrong, {m['new unparsed']} unparsed, "
                  f"{m['new truncated']} truncated, {m['new right']} right (not a mistake); "
                  f"answers that changed: {transitions(moved)}")
            if show:
                print("\n".join(lines))

        # --- rationales: answer and the gold check
        if rationales:
            result["rationales"] = gold_check(
                rationales, golds, kind, grader, show=show,
                cut=lambda x: cut.of(x, x.get("text"), model=teachers.get(x["teacher"], {}).get("model", ""),
                                     limit=teachers.get(x["teacher"], {}).get("max_tokens", 0), teacher=x["teacher"]))
        out["rounds"].append(result)
    out["cut_off_sources"] = dict(cut.sources)
    check = cut.check_token_counts() if use_tokenizer else None
    out["token_count_vs_cache"] = check
    agree = cut.recorded_vs_count
    out["token_count_vs_record"] = f"{agree[True]} / {agree[True] + agree[False]}" if agree else None
    print(f"\ncut-off flags from: {dict(cut.sources)}; the re-encoded token count agrees with the call cache's "
          f"finish_reason on {check} teacher texts and with the records' cut_off on {out['token_count_vs_record']}")
    return out


def gold_check(rationales: list[dict], golds: dict[str, str], kind: str, grader: Grader, *, cut, show: bool,
               reference: bool = False) -> dict:
    """The report's gold check (accepted/rejected x right/wrong) with the old and the new extractor, and
    with the reference implementation's rule (bench._common.reference_rule) when ``reference``."""
    cells = {"reference": Counter(), "old": Counter(), "new": Counter(), "text": Counter()}
    moved, lines, r = [], [], Counter()
    per_teacher: dict[str, Counter] = {}
    for x in rationales:
        if x.get("text") is None or x["id"] not in golds:
            continue
        gold = golds[x["id"]]
        c = cut(x)
        o_ans, o_status, _ = grader.old_(x["text"], kind)
        n_ans, n_status, _ = grader.new_(x["text"], kind, None, None if c is None else not c)
        t_ans, t_status, _ = grader.new_(x["text"], kind, None, None)
        rights = {"old": grader.old_right(o_ans, gold, kind), "new": grader.new_right(n_ans, gold, kind),
                  "text": grader.new_right(t_ans, gold, kind)}
        if reference:
            rights["reference"] = grader.new_right(reference_rule(x["text"], kind), gold, kind)
        for name, right in rights.items():
            cells[name][(bool(x["accepted"]), right)] += 1
        t = per_teacher.setdefault(x["teacher"], Counter())
        t["n"] += 1
        t["old right"] += rights["old"]
        t["new right"] += rights["new"]
        t["changed"] += shown(o_ans, o_status) != shown(n_ans, n_status)
        r["n"] += 1
        r["cut_off"] += bool(c)
        r["judged_cut_off"] += new.unfinished(x["text"])
        r["new_truncated"] += n_status == "truncated"
        r["new_unparsed"] += n_status == "unparsed"
        r["old_none"] += o_status != "ok"
        moved.append((shown(o_ans, o_status), shown(n_ans, n_status)))
        if shown(o_ans, o_status) != shown(n_ans, n_status):
            lines.append(f"    rationale {x['id']}/{x['teacher']}: {shown(o_ans, o_status)} -> "
                         f"{shown(n_ans, n_status)} (gold {gold}, accepted {x['accepted']}, cut off {c}): "
                         f"{short(x['text'])}")
    rows = []
    rule = "last number" if kind == "number" else "first true/false"
    for name, label in (("reference", f"the reference's rule ({rule})"), ("old", "old"), ("new", "new"),
                        ("text", "new, from text")):
        if name == "reference" and not reference:
            continue
        k = cells[name]
        acc, rej = k[True, True] + k[True, False], k[False, True] + k[False, False]
        rows.append([label, k[True, True] + k[False, True], f"{k[True, False]} of {acc}", f"{k[False, True]} of {rej}",
                     pct(k[True, True], acc), pct(k[True, True], k[True, True] + k[False, True])])
    print(f"\nrationales: {r['n']} written, cut off {r['cut_off']} (judged from the text: {r['judged_cut_off']}); "
          f"answer changed on {sum(a != b for a, b in moved)} ({transitions(moved)}); old: {r['old_none']} without "
          f"an answer; new: {r['new_unparsed']} unparsed, {r['new_truncated']} truncated")
    print(table(["extractor", "answer right", "accepted but wrong", "rejected but right", "precision of acceptance",
                 "recall"], rows))
    print(table(["teacher", "rationales", "right (old)", "right (new)", "answer changed"],
                [[t, c["n"], c["old right"], c["new right"], c["changed"]] for t, c in per_teacher.items()]))
    if show:
        print("\n".join(lines))
    return {"summary": dict(r), "changes": transitions(moved),
            "confusion": {name: {f"{'accepted' if a else 'rejected'} {'right' if b else 'wrong'}": v
                                 for (a, b), v in k.items()} for name, k in cells.items()
                          if name != "reference" or reference},
            "per_teacher": {t: dict(c) for t, c in per_teacher.items()}}


# ------------------------------------------------------------------------------ the reference data


def rescore_reference(ref: Path, grader: Grader, *, show: bool) -> dict:
    from mapd.stages.import_reference import import_reference
    from mapd.layout import RoundLayout

    out: dict = {}
    work = Path(tempfile.mkdtemp(prefix="ref_rescore_"))
    print(f"\n## Reference data {ref} (imported with mapd import-reference into {work})")
    for task, (false_file, feedback_file, rationale_file) in REFERENCE_FILES.items():
        folder = RoundLayout(work / task)
        import_reference(task, ref / false_file, feedback_file and ref / feedback_file,
                         rationale_file and ref / rationale_file, folder)
        mistakes = read_jsonl(folder.mistakes)
        kind = "bool" if task == "strategyqa" else "number"
        m, moved, lines = Counter(), [], []
        for x in mistakes:
            o_ans, o_status, _ = grader.old_(x["output"], kind)
            n_ans, n_status, _ = grader.new_(x["output"], kind, None, None)
            m["n"] += 1
            m["recorded right"] += grader.new_right(x["answer"], x["gold"], kind)
            m["recorded none"] += x["answer"] is None
            m["old right"] += grader.old_right(o_ans, x["gold"], kind)
            m["old none"] += o_status != "ok"
            m["new right"] += grader.new_right(n_ans, x["gold"], kind)
            m["new unparsed"] += n_status == "unparsed"
            m["new truncated"] += n_status == "truncated"
            m["judged cut off"] += new.unfinished(x["output"])
            restated = "True or False:" in x["output"].strip().split("\n")[0]  # on its first line
            m["true or false"] += (kind == "bool" and restated and x["answer"] == "true"
                                   and grader.new_right(n_ans, x["gold"], kind))
            moved.append((shown(o_ans, o_status), shown(n_ans, n_status)))
            if shown(o_ans, o_status) != shown(n_ans, n_status):
                lines.append(f"    {task} {x['id']}: {shown(o_ans, o_status)} -> {shown(n_ans, n_status)} "
                             f"(gold {x['gold']}): {short(x['output'])}")
        n = m["n"]
        for name in ("recorded", "old", "new"):
            none = m[f"{name} none"] if name != "new" else m["new unparsed"] + m["new truncated"]
            m[f"{name} still mistakes"] = n - m[f"{name} right"]
            m[f"{name} wrong answer"] = n - m[f"{name} right"] - none
        out[f"{task}_mistakes"] = dict(m, changes=transitions(moved))
        print(f"\n### {task}: {n} recorded student mistakes (Llama-2-7B), answer kind {kind}")
        print(table(["extractor", "still a mistake", "of them: a wrong answer", "no answer (unparsed / truncated)",
                     "gives the gold answer (not a mistake)"], [
            ["the reference's (recorded)", m["recorded still mistakes"], m["recorded wrong answer"],
             m["recorded none"], m["recorded right"]],
            ["old (60914a2)", m["old still mistakes"], m["old wrong answer"], m["old none"], m["old right"]],
            ["new", m["new still mistakes"], m["new wrong answer"], f"{m['new unparsed'] + m['new truncated']} "
             f"({m['new unparsed']} / {m['new truncated']})", m["new right"]],
        ]))
        changed = sum(a != b for a, b in moved)
        print(f"old -> new: {changed} answers changed ({transitions(moved)}); the new extractor judges "
              f"{m['judged cut off']} texts cut off")
        if kind == "bool":
            print(f"of the {m['new right']} that give the gold answer (new), {m['true or false']} open with a "
                  f'"True or False: <statement>" line and were recorded as "true"')
        if show:
            print("\n".join(lines))
        if rationale_file:
            rationales = read_jsonl(folder.rationales)
            golds = {x["id"]: x["gold"] for x in mistakes}
            print(f"\n### {task}: {len(rationales)} teacher rationales (accepted as recomputed by import-reference: "
                  f"{sum(x['accepted'] for x in rationales)})")
            out[f"{task}_rationales"] = gold_check(rationales, golds, kind, grader, cut=lambda x: None, show=show,
                                                   reference=True)
    return out


# ------------------------------------------------------------------------------ the labelled sets


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rescore_labelled(grader: Grader) -> dict:
    """Agreement with a person's labels: old, new (``complete`` given) and new judging from the text."""
    out: dict = {}
    cutoff = _bench("answers_cutoff")
    try:
        options = cutoff.load_options()
    except (OSError, DataNotFound) as e:
        print(f"\n(the cut-off set needs the LogiQA options: skipped; {e})")
        options = None
    if options is not None:
        rows: dict[str, Counter] = {}
        for r in cutoff.load_set():
            opts = options.get(r["ref_id"]) if r["task"] == "logiqa" else None
            got = {"old": grader.old_(r["text"], r["kind"], opts)[0],
                   "new": grader.new_(r["text"], r["kind"], opts, not r["cut_off"])[0],
                   "text": grader.new_(r["text"], r["kind"], opts, None)[0]}
            for key in ("all", r["model"], r["task"], f"{r['model']}/{r['task']}",
                        "cut off" if r["cut_off"] else "finished"):
                row = rows.setdefault(key, Counter())
                row["n"] += 1
                for name, answer in got.items():
                    row[name] += answer == r["label"]
                row["old gold"] += grader.old_right(got["old"], r["gold"], r["kind"])
                row["new gold"] += grader.new_right(got["new"], r["gold"], r["kind"])
        out["cutoff_set"] = {k: dict(v) for k, v in rows.items()}
        order = ["all", *cutoff.MODELS, *cutoff.TASKS, *(f"{m}/{t}" for m in cutoff.MODELS for t in cutoff.TASKS),
                 "cut off", "finished"]
        print(f"\n## The labelled cut-off set ({cutoff.SET.relative_to(REPO)}): agreement with a person")
        print(table(["group", "n", "old", "new (complete given)", "new, from text", "accuracy vs gold: old",
                     "accuracy vs gold: new"],
                    [[k, v["n"], pct(v["old"], v["n"]), pct(v["new"], v["n"]), pct(v["text"], v["n"]),
                      pct(v["old gold"], v["n"]), pct(v["new gold"], v["n"])]
                     for k, v in sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)]))
    accuracy = _bench("answers_accuracy")
    try:
        ref = reference_data()
    except DataNotFound as e:
        print(f"\n(the labelled reference texts are skipped: {e})")
        ref = None
    if ref is not None:
        texts = accuracy.load_texts(ref)
        rows = {}
        for label in accuracy.load_labels():
            if label["sample"] == "extra":
                continue
            text = texts[(label["source"], label["ref_id"])]
            group = label["source"].split(":")[0]
            row = rows.setdefault(group, Counter())
            row["n"] += 1
            row["old"] += grader.old_(text, label["kind"])[0] == label["label"]
            row["new"] += grader.new_(text, label["kind"])[0] == label["label"]
        out["reference_set"] = {k: dict(v) for k, v in rows.items()}
        print(f"\n## The 400 labelled reference texts ({accuracy.LABELS.relative_to(REPO)}, three draws, extras apart)")
        print(table(["group", "n", "old", "new"],
                    [[k, v["n"], pct(v["old"], v["n"]), pct(v["new"], v["n"])] for k, v in rows.items()]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], type=Path, help="a run folder (repeatable)")
    parser.add_argument("--predictions", action="append", default=[], type=Path,
                        help="a loose predictions.jsonl, e.g. a bench/reproduce_svamp.py variant's (repeatable)")
    parser.add_argument("--old", default=OLD_REV, help="git revision of the old extractor (default %(default)s)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference data")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="do not re-encode texts to tell cut-off (the extractor judges from the text)")
    parser.add_argument("--no-labelled", action="store_true", help="skip the labelled sets")
    parser.add_argument("--show", action="store_true", help="print every text whose answer changed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    grader = Grader(load_old(args.old))
    print(f"old extractor: src/mapd/answers.py at {args.old}; new: {new.__file__}")
    figures: dict = {"old": args.old, "runs": []}
    for run in args.run:
        figures["runs"].append(rescore_run(run, grader, use_tokenizer=not args.no_tokenizer, show=args.show))
    if args.predictions:
        figures["predictions"] = rescore_files(args.predictions, grader, show=args.show)
    if not args.no_reference:
        try:
            figures["reference"] = rescore_reference(reference_data(), grader, show=args.show)
        except DataNotFound as e:
            print(f"\n(reference data skipped: {e}; --no-reference skips it quietly)")
    if not args.no_labelled:
        figures["labelled"] = rescore_labelled(grader)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
