"""Builds the current stack's detectron2: a pure-Python wheel made from the pinned sal-detectron2 wheel.

    python scripts/detectron2_wheel.py OUT_DIR      -> OUT_DIR/sal_detectron2-0.7.2-py3-none-any.whl

The pinned wheel is upstream detectron2 a59f0563 with a compiled ``detectron2/_C`` for CPython 3.10
and torch 2.3.1 only. Its Python files work on newer Pythons and torch without ``_C``; what is lost is
rotated boxes, deformable conv and the fast COCO eval (COCOEvaluator then uses pycocotools). This
script downloads the cp310 wheel (pip's cache makes a second run offline-fast), drops ``_C``, tags the
result ``py3-none-any`` and lifts the ``numpy<2`` bound (the suite passes with numpy 2). RECORD is
rewritten so that pip installs and uninstalls it like any wheel.
"""
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE = "sal-detectron2==0.7.2"
OUTPUT_NAME = "sal_detectron2-0.7.2-py3-none-any.whl"


def download(folder):
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.10", "--platform", "manylinux2014_x86_64", SOURCE, "-d", str(folder)],
                   check=True)
    wheels = list(Path(folder).glob("sal_detectron2-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"detectron2_wheel: expected one {SOURCE} wheel in {folder}, found {wheels}")
    return wheels[0]


def record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def rewrite(name, data):
    """The dist-info files that change; everything else is copied byte for byte."""
    text = data.decode()
    if name.endswith(".dist-info/WHEEL"):
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith(("Tag:", "Root-Is-Purelib:"))]
        return ("\n".join(lines + ["Root-Is-Purelib: true", "Tag: py3-none-any"]) + "\n").encode()
    if name.endswith(".dist-info/METADATA"):
        return text.replace("Requires-Dist: numpy<2\n", "Requires-Dist: numpy\n").encode()
    return data


def strip_compiled(source, target):
    records = []
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for info in src.infolist():
            name = info.filename
            if name == record_name or (name.startswith("detectron2/_C") and name.endswith(".so")):
                continue
            data = src.read(name)
            if ".dist-info/" in name:
                data = rewrite(name, data)
            dst.writestr(name, data)
            records.append(record_line(name, data))
        dst.writestr(record_name, "\n".join(records + [f"{record_name},,"]) + "\n")


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        target = out / OUTPUT_NAME
        partial = out / (OUTPUT_NAME + ".partial")
        strip_compiled(download(tmp), partial)
        partial.replace(target)
    print(target)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
