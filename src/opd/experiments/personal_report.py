"""The report sections of `opd experiment personalization|continual`: a markdown table, a plot,
and the rows of `opd report`'s claims table (the blog's figures beside ours). Only the saved
results.json is read.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from opd.experiments.demo_report import pyplot

# the blog's Table ("Personalization"): Qwen3-8B on internal documents
BLOG = {
    "assistant": "IF-eval 85%, internal QA 18%",
    "midtrain": "100% documents: IF-eval 45%, QA 43%; 70% documents + 30% chat: IF-eval 79%, QA 36%",
    "opd": "70% mid-train + distillation: IF-eval 83%, QA 41%",
}
RESTORED = {
    "opd": "OPD (sampled-token)",
    "opd_full": "OPD (full vocabulary)",
    "sft_self": "SFT on the assistant's samples",
}
VARIANT = {
    "documents": "mid-trained: documents only",
    "mixed": "mid-trained: documents + chat rows",
    "lora": "mid-trained: documents, LoRA",
}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def personalization_section(r: dict, root: Path) -> tuple[str, list[tuple[str, str, str]]]:
    a = r["assistant"]
    qa = statistics.median(a["qa_new"]) if a["qa_new"] else None  # on each seed's new people
    rows = [("assistant (the teacher)", a["if"], qa, a["qa_base"])]
    rows += [(VARIANT[v], m["if"], m["qa_new"], m["qa_base"]) for v, m in r["midtrain"].items()]
    rows += [
        ("documents, then OPD from the assistant (sampled-token)", r["opd"]["if"],
         r["opd"]["qa_new"], r["opd"]["qa_base"]),
        ("documents, then OPD from the assistant (full vocabulary)", r["opd_full"]["if"],
         r["opd_full"]["qa_new"], r["opd_full"]["qa_base"]),
        ("documents, then SFT on the assistant's samples", r["sft_self"]["if"],
         r["sft_self"]["qa_new"], r["sft_self"]["qa_base"]),
    ]  # fmt: skip
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [x[1] for x in rows], 0.4, label="instruction following")
    ax.bar([x + 0.2 for x in xs], [x[2] or 0 for x in rows], 0.4, label="QA on the new people")
    ax.set_xticks(list(xs), ["assistant", *r["midtrain"], "+ OPD", "+ OPD full", "+ SFT self"])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"held-out pass rate (median of {len(r['seeds'])} seeds)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(root / "personalization.png", dpi=110)
    plt.close(fig)
    table = ["| stage | instruction following | QA, new people | QA, base people |",
             "|---|---|---|---|"]  # fmt: skip
    table += [f"| {name} | {_pct(i)} | {_pct(q)} | {_pct(b)} |" for name, i, q, b in rows]
    docs, opd = r["midtrain"]["documents"], r["opd"]
    text = "\n".join(
        [
            "## personalization: mid-train on new documents, restore instruction following",
            "",
            f"Medians over seeds {r['seeds']} (each seed: another set of new people). The "
            "assistant is the teacher; OPD and SFT on its samples start from the documents-only "
            "model and train on instruction prompts that need none of the new facts.",
            "",
            *table,
            "",
            "![personalization](personalization.png)",
            "",
        ]
    )
    claims = [
        (
            "mid-training on new documents teaches the facts and costs instruction following",
            BLOG["assistant"] + " -> " + BLOG["midtrain"],
            f"IF {_pct(a['if'])} -> {_pct(docs['if'])}; QA on the new people "
            f"{_pct(rows[0][2])} -> {_pct(docs['qa_new'])} (documents only)",
        ),
        (
            "OPD from the earlier assistant restores IF and keeps the new knowledge",
            BLOG["opd"],
            f"IF {_pct(docs['if'])} -> {_pct(opd['if'])} (full vocabulary "
            f"{_pct(r['opd_full']['if'])}; assistant {_pct(a['if'])}); QA {_pct(docs['qa_new'])} "
            f"-> {_pct(opd['qa_new'])} ({_pct(r['opd_full']['qa_new'])}); SFT on its samples: IF "
            f"{_pct(r['sft_self']['if'])}, QA {_pct(r['sft_self']['qa_new'])}",
        ),
    ]
    return text, claims


def continual_section(r: dict, root: Path) -> tuple[str, list[tuple[str, str, str]]]:
    tracks = {
        "OPD from the previous phase": r["phases"],
        "OPD from the original assistant": r["phases_original_teacher"],
        "mid-training only": r["midtrain_only"],
    }
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, phases) in enumerate(tracks.items()):
        ks = range(1, len(phases) + 1)
        a1.plot(ks, [p.get("if_opd", p["if_midtrain"]) for p in phases], f"C{i}o-", label=name)
        a2.plot(ks, [sum(p["qa"]) / len(p["qa"]) for p in phases], f"C{i}o-", label=name)
    a1.axhline(r["assistant"]["if"], color="gray", ls="--", label="assistant")
    a1.set_ylabel("instruction following after the phase")
    a2.set_ylabel("QA, mean over every phase's people so far")
    for ax in (a1, a2):
        ax.set_xlabel("phase")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(root / "continual.png", dpi=110)
    plt.close(fig)
    table = ["| phase | track | IF after mid-training | IF after OPD | QA per phase's people |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, phases in tracks.items():
        for k, p in enumerate(phases, 1):
            qa = ", ".join(_pct(x) for x in p["qa"])
            table.append(
                f"| {k} | {name} | {_pct(p['if_midtrain'])} | {_pct(p.get('if_opd'))} | {qa} |"
            )
    text = "\n".join(
        [
            "## continual: alternate mid-training on new documents and OPD",
            "",
            f"Seed {r['seeds'][0]}; the assistant's instruction following: {_pct(r['assistant']['if'])}.",
            "",
            *table,
            "",
            "![continual](continual.png)",
            "",
        ]
    )
    last, only = r["phases"][-1], r["midtrain_only"][-1]
    claims = [
        (
            "alternating mid-training and OPD keeps behaviour while knowledge accumulates",
            "proposed, not measured",
            f"after {len(r['phases'])} phases: IF {_pct(last['if_opd'])} (mid-training only "
            f"{_pct(only['if_midtrain'])}); QA per phase {', '.join(map(_pct, last['qa']))}",
        )
    ]
    return text, claims


def sweep_section(r: dict, root: Path) -> tuple[str, list[tuple[str, str, str]]]:
    mid, best = r["midtrain"], r["best"]
    table = ["| run | learning rate | instruction following | QA, new people | QA, base people "
             "| balance |", "|---|---|---|---|---|---|"]  # fmt: skip
    for lr, m in r["lora"].items():
        pick = " (picked)" if lr == best["lora"] else ""
        table.append(f"| mid-training, LoRA | {lr}{pick} | {_pct(m['if'])} | "
                     f"{_pct(m['qa_new'])} | {_pct(m['qa_base'])} | - |")  # fmt: skip
    for name in ("opd", "opd_full", "sft_self"):
        for lr, m in r[name].items():
            pick = " (picked)" if lr == best[name] else ""
            table.append(f"| {RESTORED[name]} | {lr}{pick} | {_pct(m['if'])} | "
                         f"{_pct(m['qa_new'])} | {_pct(m['qa_base'])} | {m['balance']:.2f} |")  # fmt: skip
    text = "\n".join(
        [
            "## personalization-sweep: learning rates on a held-out set",
            "",
            f"New set {r['set']} with seed {r['set']} (no reported seed reads it). The assistant: "
            f"IF {_pct(r['assistant']['if'])}; mid-trained on the documents: IF {_pct(mid['if'])}, "
            f"QA on the new people {_pct(mid['qa_new'])}. The restoring runs start from that "
            "model; balance = min(IF / the assistant's IF, QA / the mid-trained model's QA) "
            "picks their rate, QA on the new people picks LoRA's.",
            "",
            *table,
            "",
        ]
    )
    return text, []
