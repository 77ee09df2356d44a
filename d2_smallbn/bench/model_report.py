"""The model benchmark's results and report: per-round ratios of each setting to the settings it is
compared with, the targets' verdicts, the markdown table and the bar chart."""
import statistics

from .common import contention_line, fmt_summary, pyplot, summary
from .measure import timing
from .model_settings import FOLD_REF, setting
from .targets import TARGETS, verdict


def _train(key, train_t):
    s = setting(key)
    return timing(train_t[key], **{ref: train_t[ref] for ref in (s.reference, *s.also)})


def _infer(key, infer_t):
    ref = setting(key).reference
    return timing(infer_t[(key, False)], **{ref: infer_t[(ref, False)], FOLD_REF: infer_t[(FOLD_REF, False)]})


def _infer_folded(key, infer_t):
    s = setting(key)
    folded = infer_t[(key, True)]
    refs = {"unfolded": infer_t[(key, False)]}
    refs.update({f"{ref}_folded": infer_t[(ref, True)] for ref in (s.reference, FOLD_REF)})
    refs[f"{FOLD_REF}_unfolded"] = infer_t[(FOLD_REF, False)]
    refs.update({f"{ref}_folded": infer_t[(ref, True)] for ref in s.also})
    return timing(folded, **refs)


def _memory(keys, steps):
    memory = {}
    for key in keys:
        entries = steps[key]
        memory[key] = {name: statistics.median(e[name] for e in entries) for name in entries[0]}
        memory[key]["steps"] = entries
    for key in keys:
        s = setting(key)
        for ref in (s.reference, *s.also):
            memory[key][f"ratio_vs_{ref}"] = memory[key]["metric_bytes"] / memory[ref]["metric_bytes"]
    return memory


def analyse(raw, keys, device_type):
    """(results, the targets' verdicts on ``device_type``, the foreground RoIs per image of each setting)."""
    train_t, infer_t = raw["train"], raw["infer"]
    results = {"train": {k: _train(k, train_t) for k in keys}, "infer": {k: _infer(k, infer_t) for k in keys},
               "infer_folded": {k: _infer_folded(k, infer_t) for k in keys}, "memory": _memory(keys, raw["memory"])}
    targets = []
    for t in TARGETS["model"]:
        judged = verdict(t, results, device_type)
        if judged is not None:
            targets.append({"name": t.name, "setting": t.setting, "section": t.section, "ratio": t.ratio,
                            "description": t.describe(judged["bound"]), **judged})
    work = {k: summary(raw["settings"][k].num_fg) if raw["settings"][k].num_fg else None for k in keys}
    return results, targets, work


# ---- markdown -----------------------------------------------------------------------------------

def _setting_row(key, res, work):
    s = setting(key)
    ref = s.reference
    tr, mem = res["train"][key], res["memory"][key]
    inf, fol = res["infer"][key], res["infer_folded"][key]
    t_cell, m_cell = fmt_summary(tr[f"ratio_vs_{ref}"]), f"{mem[f'ratio_vs_{ref}']:.3f}"
    f_ref = fmt_summary(fol[f"ratio_vs_{ref}_folded"])
    for other in s.also:
        t_cell += f"; vs {other} {fmt_summary(tr[f'ratio_vs_{other}'])}"
        m_cell += f"; vs {other} {mem[f'ratio_vs_{other}']:.3f}"
        f_ref += f"; vs {other} folded {fmt_summary(fol[f'ratio_vs_{other}_folded'])}"
    fg = f"{work['median']:.0f}" if work else "-"
    return (f"| {key}: {s.label} | {ref} | {t_cell} | {m_cell} | {fmt_summary(inf[f'ratio_vs_{ref}'])} "
            f"| {fmt_summary(fol['ratio_vs_frozen_none_folded'])} "
            f"| {fmt_summary(fol['ratio_vs_frozen_none_unfolded'])} | {f_ref} | {fg} |")


def _target_row(t):
    if t["measured"] is None:
        return f"| {t['description']} | not measured | - |"
    met = "yes" if t["met"] else "**no**"
    if not t["conclusive"]:
        met += " (IQR straddles the bound)"
    return f"| {t['description']} | {t['measured']:.3f} | {met} |"


def _absolute_line(dev, keys, res):
    ms = lambda k, section: res[section][k]["median_s"] * 1e3  # noqa: E731
    parts = [f"{k} train step {ms(k, 'train'):.1f} ms" for k in ("frozen_bn", "bn") if k in keys]
    parts.append(f"frozen_none inference {ms(FOLD_REF, 'infer'):.1f} ms unfolded, "
                 f"{ms(FOLD_REF, 'infer_folded'):.1f} ms folded")
    parts += [f"{k} memory metric {res['memory'][k]['metric_bytes'] / 2**20:.0f} MiB" for k in ("frozen_bn", "bn")
              if k in keys]
    return f"Absolute medians on {dev['name']}: " + "; ".join(parts) + "."


def markdown(report):
    dev, cfg, res = report["device"], report["config"], report["results"]
    keys = cfg["settings"]
    cpu_extra = f", {dev['cpu_count']} cores" if dev["type"] == "cpu" else ""
    mem_desc = ("CUDA max_memory_allocated during one training step minus the memory allocated before it, plus the "
                "model's parameters, buffers and optimizer state" if dev["type"] == "cuda" else
                "bytes of unique storages saved for backward (saved_tensors_hooks, parameters excluded) plus the "
                "model's parameters, gradients, buffers and optimizer state")
    model = (f"Mask R-CNN R{cfg['depth']}-FPN, 4conv1fc box head" + (" (tiny: 32-channel FPN/heads, few RoIs)"
                                                                     if cfg["tiny"] else ""))
    lines = [
        "# benchmark (model level)", "",
        f"{model}, batch {cfg['batch']}, input {cfg['size'][0]}x{cfg['size'][1]}, FREEZE_AT 2 in every setting, "
        f"random init, SGD lr {cfg['lr']}. {cfg['iters']} timed rounds after {cfg['warmup']} warmup rounds, "
        f"settings interleaved round-robin. Device: {dev['name']} ({dev['type']}{cpu_extra}, "
        f"torch {report['torch_version']}, {dev['torch_threads']} threads).", "",
        "Ratios: median over rounds of the per-round ratio [interquartile range], to the reference of the same "
        "round (frozen_* to frozen_bn, the everywhere settings to bn). Train step = forward + backward + SGD "
        "step, steady state (CBN window full, MABN moving averages with clipping). Inference = "
        "`model.inference(do_postprocess=False)`, eval, no_grad, "
        f"{cfg['detections_per_image']} detections per image. Peak memory: {mem_desc} "
        f"(median of {cfg['memory_rounds']} untimed steps). Folded models were checked against the unfolded "
        "ones on the benchmark inputs before timing.", "",
        f"Command: `{report['command']}`",
    ]
    if cfg["added_references"]:
        lines += ["", f"References added to the requested settings: {', '.join(cfg['added_references'])}."]
    line = contention_line(report["contention"], dev)
    if line:
        lines += ["", line]
    lines += ["", "| setting | reference | train step | peak memory | inference | folded inference vs frozen_none "
                  "folded | vs frozen_none unfolded | vs reference folded | fg RoIs/step |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [_setting_row(key, res, report["work_fg_rois_per_image"][key]) for key in keys]
    lines += ["", "| target | measured | met? |", "|---|---|---|"]
    lines += [_target_row(t) for t in report["targets"]]
    lines += ["", _absolute_line(dev, keys, res)]
    lines += ["", "fg RoIs/step: median foreground RoIs per image sampled for the heads in the timed steps (the "
                  "mask head's work). Training steps use the same fixed proposals in every setting, so it is the "
                  "same for all."]
    return "\n".join(lines) + "\n"


# ---- chart ----------------------------------------------------------------------------------------

def _bars(ax, targeted, section, rows, bound, title):
    """rows: (label, setting, ratio key, value or summary); a bar that carries a target is orange."""
    vals, lo, hi, colors = [], [], [], []
    for _, key, ratio_key, v in rows:
        s = v if isinstance(v, dict) else {"median": v, "p25": v, "p75": v}
        vals.append(s["median"])
        lo.append(s["median"] - s["p25"])
        hi.append(s["p75"] - s["median"])
        colors.append("tab:orange" if (section, key, ratio_key) in targeted else "tab:blue")
    ax.bar(range(len(rows)), vals, color=colors, yerr=[lo, hi], capsize=3)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(bound, color="red", ls="--", lw=1.2, label=f"target {bound:.2f}x (orange bars)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r[0] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _reference_rows(res, keys, section):
    rows = []
    for k in keys:
        ref = setting(k).reference
        rows.append((f"{k}/{ref}", k, f"ratio_vs_{ref}", res[section][k][f"ratio_vs_{ref}"]))
    for k in keys:
        rows += [(f"{k}/{other}", k, f"ratio_vs_{other}", res[section][k][f"ratio_vs_{other}"])
                 for other in setting(k).also]
    return rows


def plot(report, path):
    """Bar chart of the ratios; bars that carry a target are orange, the target a red dashed line."""
    plt = pyplot()
    res, keys = report["results"], report["config"]["settings"]
    targeted = {(t["section"], t["setting"], t["ratio"]) for t in report["targets"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    _bars(axes[0], targeted, "train", _reference_rows(res, keys, "train"), 1.10,
          "training step time ratio (median, IQR)")
    _bars(axes[1], targeted, "memory", _reference_rows(res, keys, "memory"), 1.05, "peak training memory ratio")
    rows = [(f"{k} folded", k, "ratio_vs_frozen_none_folded", res["infer_folded"][k]["ratio_vs_frozen_none_folded"])
            for k in keys]
    _bars(axes[2], targeted, "infer_folded", rows, 1.03, "folded inference time ratio vs frozen_none folded")
    axes[0].set_ylabel("ratio to the reference of the same run")
    dev, cfg = report["device"], report["config"]
    fig.suptitle(f"Mask R-CNN R{cfg['depth']}-FPN, batch {cfg['batch']}, {cfg['size'][0]}x{cfg['size'][1]}"
                 f"{' (tiny)' if cfg['tiny'] else ''}, {cfg['iters']} timed rounds on {dev['name']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
