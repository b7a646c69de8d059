"""The model card (README.md) of a trained hybrid: how it was made, with the numbers the run measured."""

from __future__ import annotations

import os
from pathlib import Path


def card_text(recipe, state: dict, result) -> str:
    cfg_lines = [
        "---",
        "library_name: transformers",
        "tags: [hybridize, hybrid-attention, lightning-attention, sparse-attention]",
        "---",
        "",
        "# Hybrid model trained with `hybridize train`",
        "",
        f"Start: {state.get('description', '')}.",
        "",
        "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.",
        "",
        "## Stages",
        "",
        "| stage | seq len | steps | tokens | lr | schedule | trains | loss (hidden MSE / KL / CE) | held-out loss | held-out ppl |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in state.get("stages", []):
        loss = s["loss"]
        kl = f"{loss['kl']} ({s['kl_direction']}, T={s['temperature']})" if loss["kl"] else "0"
        ho = f"{s['heldout_loss']:.4f}" if "heldout_loss" in s else "-"
        ppl = f"{s['heldout_ppl']:.3f}" if "heldout_ppl" in s else "-"
        cfg_lines.append(f"| {s['name']} | {s['seq_len']} | {s['steps']} | {s['tokens']:,} | {s['lr']:g} | "
                         f"{s['schedule']} | {s['trainable']} | {loss['hidden_mse']} / {kl} / {loss['ce']} | {ho} | {ppl} |")
    cfg_lines += [
        "",
        f"Total training tokens: {result.tokens:,} in {result.global_step} optimizer steps.",
        "",
    ]
    if state.get("metrics"):
        m = state["metrics"]
        cfg_lines.append("Final held-out metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + ".")
        cfg_lines.append("")
    cfg_lines += ["Data sources: " + ", ".join(f"{s.type}:{s.path or 'teacher samples'} (weight {s.weight})"
                                               for s in recipe.data.sources) + ".", ""]
    return "\n".join(cfg_lines)


def write_card(folder: Path, recipe, state: dict, result) -> Path:
    path = Path(folder) / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(card_text(recipe, state, result))
    os.replace(tmp, path)
    return path
