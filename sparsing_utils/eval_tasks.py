"""The benchmarks of the paper's Tables 4-5 as lm-evaluation-harness tasks built from local files.

lm-eval's standard tasks download their data from the Hugging Face hub. Offline, the same tasks
are built here from the files in ``../shared/data/`` (see its README and each ``SOURCE.md``):
each local file is read into the *fields of the hub dataset* that lm-eval's task YAML expects, and
the task is lm-eval's own configuration (its YAML, loaded by lm-eval's loader, with its
``!function`` utilities: HellaSwag's ``process_docs``, WinoGrande's partial evaluation, COPA's
connector) with only the dataset replaced (``custom_dataset``). Prompts, choices, targets and
metrics (acc, acc_norm, LAMBADA's perplexity) are therefore lm-eval's, not a copy of them.

One table, :data:`LOCAL_TASKS`, says for each task: lm-eval's task and YAML, the local files,
the split they stand in for, the reader, and where the reconstruction could differ from the
hub dataset (three of the local files are llm-foundry's reformatted versions).
"""
from __future__ import annotations

import bz2
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOCAL_TASKS",
    "TASK_ALIASES",
    "LocalTask",
    "build_local_task",
    "check_local_data",
    "lm_eval_name",
    "read_docs",
]


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _with_labels(docs: list[dict], labels: list[str], path: Path) -> None:
    if len(docs) != len(labels):
        raise ValueError(f"{path}: {len(labels)} labels for {len(docs)} items; the two files must be aligned")


# -- readers: local files -> the hub dataset's fields ---------------------------------------

def _read_piqa(items: Path, labels_file: Path) -> list[dict]:
    # baber/piqa: goal, sol1, sol2, label (0 -> sol1)
    docs, labels = _jsonl(items), _lines(labels_file)
    _with_labels(docs, labels, labels_file)
    return [{"goal": x["goal"], "sol1": x["sol1"], "sol2": x["sol2"], "label": int(y)} for x, y in zip(docs, labels)]


def _read_siqa(items: Path, labels_file: Path) -> list[dict]:
    # lighteval/siqa: context, question, answerA-C, label "1".."3" (1-based, as the release)
    docs, labels = _jsonl(items), _lines(labels_file)
    _with_labels(docs, labels, labels_file)
    return [{**{k: x[k] for k in ("context", "question", "answerA", "answerB", "answerC")}, "label": str(int(y))}
            for x, y in zip(docs, labels)]


# ActivityNet contexts end in an incomplete noun phrase (ctx_b, lower case in the release); lm-eval
# capitalises it. The llama.cpp file keeps only "label: ctx_a ctx_b": ctx_b is taken back as the text
# after the last sentence end when the context itself does not end a sentence (WikiHow contexts do).
_SENTENCE_END = re.compile(r"[.!?][\"')]?\s+")


def _split_context(ctx: str) -> tuple[str, str]:
    """``ctx = ctx_a + " " + ctx_b`` -> ``(ctx_a, ctx_b)``; ``ctx_b`` is empty for complete contexts."""
    if ctx[-1:] in ".!?\"')":
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return "", ctx
    cut = ends[-1].end()
    return ctx[:cut].rstrip(), ctx[cut:]


def _read_hellaswag(path: Path) -> list[dict]:
    # Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings, label (a string); lm-eval's process_docs
    # then builds query/choices/gold exactly as for the hub data.
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not 6 per item (header, label, 4 endings)")
    docs = []
    for i in range(0, len(lines), 6):
        label, _, ctx = lines[i].partition(": ")
        ctx_a, ctx_b = _split_context(ctx)
        docs.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": ctx, "endings": lines[i + 2:i + 6], "label": str(int(lines[i + 1]))})
    return docs


def _read_winogrande(path: Path) -> list[dict]:
    # allenai/winogrande: sentence with "_", option1, option2, answer "1"/"2". The llm-foundry file holds
    # the two filled-in prefixes and the text after the blank; the options are their differing ends
    # (backed off to a word start, so "Sam"/"Sarah" stay whole names).
    docs = []
    for x in _jsonl(path):
        a, b = x["context_options"]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        n = max(a.rfind(" ", 0, n) + 1, 0) if n < max(len(a), len(b)) else n
        rest = x["continuation"]
        sep = "" if rest[:1] in ".,;:!?'\")" else " "
        docs.append({"sentence": a[:n] + "_" + sep + rest, "option1": a[n:], "option2": b[n:],
                     "answer": str(int(x["gold"]) + 1)})
    return docs


_COPA_CONNECTORS = {", because": "cause", ", therefore": "effect"}


def _read_copa(path: Path) -> list[dict]:
    # aps/super_glue copa: premise, choice1, choice2, question (cause/effect), label. llm-foundry's query is
    # the premise with its final period replaced by ", because"/", therefore".
    docs = []
    for i, x in enumerate(_jsonl(path)):
        query = x["query"]
        tail = next((t for t in _COPA_CONNECTORS if query.endswith(t)), None)
        if tail is None:
            raise ValueError(f"{path} item {i}: query does not end in ', because' or ', therefore'")
        docs.append({"premise": query[: -len(tail)] + ".", "choice1": x["choices"][0], "choice2": x["choices"][1],
                     "question": _COPA_CONNECTORS[tail], "label": int(x["gold"]), "idx": i})
    return docs


def _read_boolq(path: Path) -> list[dict]:
    # aps/super_glue boolq: passage, question (no "?"), label (1 = yes). llm-foundry's query is
    # "Passage: " + passage + "\nQuestion: " + question + "?"; split on the LAST "\nQuestion: ".
    docs = []
    for i, x in enumerate(_jsonl(path)):
        passage, sep, question = x["query"].rpartition("\nQuestion: ")
        if not sep:
            raise ValueError(f"{path} item {i}: no '\\nQuestion: ' in the query")
        docs.append({"passage": passage.removeprefix("Passage: "), "question": question.removesuffix("?"),
                     "label": int(x["gold"]), "idx": i})
    return docs


def _read_lambada(path: Path) -> list[dict]:
    # EleutherAI/lambada_openai: text (the target is its last word); the same file as OpenAI's.
    return [{"text": x["text"]} for x in _jsonl(path)]


@dataclass(frozen=True)
class LocalTask:
    """One offline task: lm-eval's task ``lm_eval`` (YAML ``yaml`` under ``lm_eval/tasks``) on the
    local ``files`` (relative to the data folder), standing in for the hub dataset's ``split``."""

    name: str
    lm_eval: str
    yaml: str
    files: tuple[str, ...]
    split: str
    read: Callable[..., list[dict]]  # called with the paths of ``files``
    group: str  # the paper's task group (Table 1): commonsense reasoning or reading comprehension
    paper: str  # the task's column in the paper's Table 4 or 5 (data/table4.csv, data/table5.csv)
    score: str  # the lm-eval metric compared with the paper (acc; acc_norm for HellaSwag, as usually reported)
    note: str  # where the local data or its reconstruction can differ from lm-eval's hub dataset


LOCAL_TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("piqa", "piqa", "piqa/piqa.yaml", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation",
              _read_piqa, "commonsense", "PIQA", "acc",
              "the official release files; same items and labels as the hub copy"),
    LocalTask("siqa", "social_iqa", "siqa/siqa.yaml", ("siqa/dev.jsonl", "siqa/dev-labels.lst"), "validation",
              _read_siqa, "commonsense", "SIQA", "acc",
              "the official AI2 dev files (1-based labels, as the hub copy)"),
    LocalTask("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", ("hellaswag/hellaswag_val_full.txt.bz2",),
              "validation", _read_hellaswag, "commonsense", "HellaSwag", "acc_norm",
              "llama.cpp's text file: its context is ctx_a + ' ' + ctx_b already cleaned; ctx_b (capitalised by "
              "lm-eval) is taken back as the unfinished phrase after the last sentence end, which is how "
              "ActivityNet contexts end; lm-eval's cleaning then runs again (it also drops the few [..] the file "
              "kept)"),
    LocalTask("winogrande", "winogrande", "winogrande/default.yaml", ("winogrande/winogrande.jsonl",), "validation",
              _read_winogrande, "commonsense", "WinoGrande", "acc",
              "llm-foundry's partial-evaluation form: lm-eval's choices (sentence up to the blank + option) and "
              "target (the rest) are rebuilt exactly; only option1/option2 as fields are a reconstruction"),
    LocalTask("copa", "copa", "super_glue/copa/default.yaml", ("copa/copa.jsonl",), "validation",
              _read_copa, "commonsense", "COPA", "acc",
              "llm-foundry's form: premise = query without ', because'/', therefore' plus '.', question = the "
              "connector; lm-eval drops that last character and lower-cases each choice's first letter, so the "
              "lost capitals and the premise's exact final mark do not change what is scored"),
    LocalTask("boolq", "boolq", "super_glue/boolq/default.yaml", ("boolq/boolq.jsonl",), "validation",
              _read_boolq, "reading", "BoolQ", "acc",
              "llm-foundry's form: passage and question split on the last '\\nQuestion: ' (the Wikipedia title, "
              "unused by lm-eval, is lost)"),
    LocalTask("lambada", "lambada_openai", "lambada/lambada_openai.yaml", ("lambada/lambada_test.jsonl",), "test",
              _read_lambada, "reading", "LAMBADA", "acc",
              "OpenAI's file itself (lm-eval's lambada_openai is built from it)"),
)}

# our short names -> lm-eval's task names (used for hub tasks too)
TASK_ALIASES = {t.name: t.lm_eval for t in LOCAL_TASKS.values()}


def lm_eval_name(task: str) -> str:
    """lm-eval's name for a task (``siqa`` -> ``social_iqa``, ``lambada`` -> ``lambada_openai``)."""
    return TASK_ALIASES.get(task, task)


def local_task(name: str) -> LocalTask:
    """The :class:`LocalTask` for our name or lm-eval's (``social_iqa`` is ``siqa``)."""
    for t in LOCAL_TASKS.values():
        if name in (t.name, t.lm_eval):
            return t
    raise ValueError(f"no local data for the task {name!r}: the offline tasks are {', '.join(LOCAL_TASKS)} "
                     "(lm-eval's hub tasks need the network: leave out --data-dir)")


def check_local_data(tasks: list[str], data_dir: str | Path) -> Path:
    """Check, before any model work, that ``data_dir`` holds every task's files; returns it."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {str(root)!r} not found: pass --data-dir with the folder of the "
                                "offline evaluation data (../shared/data from the repository root)")
    for name in tasks:
        for f in local_task(name).files:
            if not (root / f).is_file():
                raise FileNotFoundError(f"{str(root / f)!r} not found: the task {name!r} reads {f} under --data-dir "
                                        f"({str(root)!r}); see {str(root / 'README.md')!r} for the expected layout")
    return root


@functools.lru_cache(maxsize=16)
def _docs_cached(name: str, folder: str, stamp: tuple) -> tuple[dict, ...]:
    return tuple(LOCAL_TASKS[name].read(*(Path(folder) / f for f in LOCAL_TASKS[name].files)))


def read_docs(name: str, data_dir: str | Path) -> list[dict]:
    """The task's local items in the hub dataset's fields (read once per file version)."""
    task = local_task(name)
    root = Path(data_dir).expanduser().resolve()
    stamp = tuple((f, (root / f).stat().st_mtime_ns, (root / f).stat().st_size) for f in task.files)
    return [dict(d) for d in _docs_cached(task.name, str(root), stamp)]


def _dataset(split: str, docs: list[dict], **_metadata):
    """lm-eval's ``custom_dataset`` hook: called with the task's metadata, returns the splits."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def build_local_task(name: str, data_dir: str | Path):
    """lm-eval's own task ``name`` (its YAML and functions) on the local files: a ``ConfigurableTask``."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import (
        load_yaml,  # the loader lm-eval's TaskManager uses
    )

    task = local_task(name)
    root = check_local_data([task.name], data_dir)
    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / task.yaml, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    docs = read_docs(task.name, root)
    cfg.update({
        "dataset_path": str((root / task.files[0]).resolve()), "dataset_name": None, "dataset_kwargs": None,
        "custom_dataset": functools.partial(_dataset, task.split, docs),
        # only the evaluated split exists locally: no training split, so no few-shot examples
        "training_split": None, "fewshot_split": None,
        "validation_split": task.split if task.split == "validation" else None,
        "test_split": task.split if task.split == "test" else None,
        "metadata": {**(cfg.get("metadata") or {}), "local_files": list(task.files)},
    })
    return ConfigurableTask(config=cfg)
