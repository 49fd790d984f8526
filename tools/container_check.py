"""`make container-check`: prove the Dockerfile's recipe without a container engine.

Replays the Dockerfile's own steps on this machine:

1. parses the Dockerfile (ARG, ENV, COPY, RUN, USER, ENTRYPOINT);
2. creates a clean virtual environment (no system site-packages) in a temporary folder
   standing in for the image, performs every COPY into it and runs every ``RUN`` that
   installs with pip, verbatim except that ``python`` is the venv's interpreter and
   absolute image paths (``/opt/...``) lie under the temporary root;
3. checks that every installed distribution matches ``constraints.txt`` (``pip check``
   and exact versions);
4. makes the image and the input data read-only (and, when run as root, drops to an
   unprivileged user, like ``USER`` in the image), sets the image's ``ENV`` with ``/tmp``
   mapped to a scratch folder (like ``--read-only --tmpfs /tmp``), and runs the
   ``ENTRYPOINT`` in the BIDS-Apps form on the embedded sample dataset:
   ``nuclei-app BIDS OUT participant --participant-label 01 ...``;
5. checks the derivative outputs and prints the time of every step.

Usage: ``python tools/container_check.py [--keep] [--steps N] [--build-arg NAME=VALUE ...]``
from the repository root (``--build-arg TORCH_VARIANT=cpu`` replays the slim CPU image,
which needs PyTorch's CPU wheel index to be reachable). The size of the installed
environment is printed, split into the CUDA libraries, triton, torch and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def substitute(text: str, variables: dict[str, str]) -> str:
    """Expand ``${NAME}`` and ``$NAME`` from the Dockerfile's ARG/ENV values."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_pairs(text: str) -> dict[str, str]:
    """``K=V K2="V 2"`` (ENV / LABEL / ARG syntax) -> dict."""
    pairs = {}
    for token in shlex.split(text):
        key, _, value = token.partition("=")
        pairs[key] = value
    return pairs


def step(message: str, started: float) -> None:
    print(f"[container-check] {message} ({time.monotonic() - started:.0f} s)", flush=True)


def run(command: list[str] | str, **options) -> None:
    shown = command if isinstance(command, str) else " ".join(shlex.quote(c) for c in command)
    print(f"+ {shown}", flush=True)
    subprocess.run(command, check=True, shell=isinstance(command, str), **options)


def set_writable(root: Path, writable: bool) -> None:
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            path.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    mode = root.stat().st_mode
    root.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def environment_size(venv: Path) -> dict[str, int]:
    """Bytes of the installed environment: CUDA wheels (nvidia-*, cuda-*), triton, torch, the rest."""
    groups = {"cuda libraries (nvidia-*, cuda-*)": 0, "triton": 0, "torch": 0, "everything else": 0}
    for folder, _, files in os.walk(venv):
        relative = Path(folder).relative_to(venv).parts
        top = relative[3] if len(relative) > 3 and relative[:1] == ("lib",) else ""  # lib/python3.11/site-packages/<top>
        if top.startswith(("nvidia", "cuda")):
            group = "cuda libraries (nvidia-*, cuda-*)"
        elif top.startswith("triton"):
            group = "triton"
        elif top == "torch" or top.startswith("torch-"):
            group = "torch"
        else:
            group = "everything else"
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                groups[group] += path.stat().st_size
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--steps", type=int, default=10, help="training steps of the tiny model (default 10)")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="override an ARG of the Dockerfile, like docker build --build-arg (e.g. TORCH_VARIANT=cpu)")
    options = parser.parse_args()
    build_args = {}
    for item in options.build_arg:
        name, equals, value = item.partition("=")
        if not equals or not name:
            parser.error(f"--build-arg takes NAME=VALUE, not {item!r}")
        build_args[name] = value
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="nuclei-app-container-check-"))
    scratch.chmod(0o755)
    image_root, venv = scratch / "image", scratch / "image" / "venv"
    try:
        instructions = dockerfile_instructions(REPO / "Dockerfile")
        base = next(args for keyword, args in instructions if keyword == "FROM")
        if not base.startswith("python:3.11"):
            raise SystemExit(f"the Dockerfile's base is {base}; this check needs it to be python:3.11 (same as here)")
        if sys.version_info[:2] != (3, 11):
            raise SystemExit(f"run this check with Python 3.11 (the image's), not {sys.version.split()[0]}")
        run([sys.executable, "-m", "venv", str(venv)])
        python = venv / "bin" / "python"
        variables: dict[str, str] = dict(build_args)  # ARG defaults below do not replace these
        image_env: dict[str, str] = {}
        user = entrypoint = None
        for keyword, args in instructions:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                variables.setdefault(name, default)
            elif keyword == "ENV":
                for key, value in parse_pairs(args).items():
                    image_env[key] = variables[key] = substitute(value, variables)
            elif keyword == "COPY":
                *sources, destination = shlex.split(args)
                target = image_root / destination.lstrip("/")
                for source in sources:
                    origin = REPO / source
                    goal = target / origin.name if destination.endswith("/") else target
                    goal.parent.mkdir(parents=True, exist_ok=True)
                    if origin.is_dir():
                        shutil.copytree(origin, goal, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                    else:
                        shutil.copy2(origin, goal)
            elif keyword == "RUN":
                command = substitute(args, variables)
                if "pip install" not in command:
                    print(f"[container-check] not replayed (system change, needs root): RUN {command}")
                    continue
                if "-c /opt/nuclei-app/constraints.txt" not in command:
                    raise SystemExit(f"a pip install step does not use the constraints file: {command}")
                local = re.sub(r"(?<![\w/])python(?= )", str(python), command)
                local = local.replace(" /opt/", f" {image_root}/opt/")
                build_env = {**os.environ, **{k: v for k, v in image_env.items() if k.startswith(("PIP_", "PYTHON"))}}
                run(local, env=build_env)
            elif keyword == "USER":
                user = args
            elif keyword == "ENTRYPOINT":
                entrypoint = json.loads(args)
        step("image environment built from the Dockerfile's steps", started)

        constraints = {}
        for line in (REPO / "constraints.txt").read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("==")
                constraints[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
        run([str(python), "-m", "pip", "check"])
        listed = json.loads(subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                                           check=True, capture_output=True, text=True).stdout)
        mismatched = [
            f"{d['name']} {d['version']} (constraints: {constraints[key]})"
            for d in listed
            if (key := re.sub(r"[-_.]+", "-", d["name"].lower())) in constraints
            and d["version"].split("+")[0] != constraints[key].split("+")[0]
        ]
        if mismatched:
            raise SystemExit(f"installed versions differ from constraints.txt: {', '.join(mismatched)}")
        step(f"{len(listed)} distributions installed, all at their constraints.txt versions", started)
        sizes = environment_size(venv)
        for group, size in sizes.items():
            print(f"[container-check] size: {group}: {size / 1e9:.2f} GB", flush=True)
        print(f"[container-check] size: installed environment ({variables.get('TORCH_VARIANT', '?')} torch): "
              f"{sum(sizes.values()) / 1e9:.2f} GB, plus the python:3.11-slim base", flush=True)

        if not entrypoint or entrypoint[0] != "nuclei-app" or not user or user.split(":")[0] in ("root", "0"):
            raise SystemExit(f"unexpected ENTRYPOINT {entrypoint} or USER {user}")
        data, output, tmp = scratch / "data", scratch / "out", scratch / "tmp"
        run([str(python), "-c", "import sys; from nuclei_app.sample_data import make_sample_dataset; "
             "make_sample_dataset(sys.argv[1], seed=0)", str(data)])
        for folder in (output, tmp):
            folder.mkdir()
            folder.chmod(0o777)  # the mounted output and the tmpfs are writable for the image's user
        set_writable(image_root, False)  # --read-only
        set_writable(data, False)  # -v ...:/data:ro
        env = {key: value.replace("/tmp", str(tmp)) for key, value in image_env.items()}
        env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
        prefix: list[str] = []
        if os.geteuid() == 0:  # root ignores file modes: run as an unprivileged user, like USER in the image
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise SystemExit("running as root without setpriv: cannot drop privileges like the image's USER")
            prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        executable = str(venv / "bin" / entrypoint[0])
        run([*prefix, executable, *entrypoint[1:], "--version"], env=env, cwd=tmp)
        command = [
            *prefix, executable, *entrypoint[1:], str(data / "bids"), str(output), "participant",
            "--participant-label", "01", "--steps", str(options.steps), "--rounds", "0", "--heads", "1",
            "--max-minutes", "3", "--device", "cpu",
        ]
        run(command, env=env, cwd=tmp)
        step("entry point ran in the BIDS-Apps form on the sample dataset", started)

        description = json.loads((output / "dataset_description.json").read_text())
        if description["DatasetType"] != "derivative" or description["GeneratedBy"][0].get("Container", {}).get("Type") != "docker":
            raise SystemExit(f"unexpected dataset_description.json: {description}")
        micr = output / "sub-01" / "ses-01" / "micr"
        expected = [
            "sub-01_ses-01_sample-A_desc-nuclei_FLUO.ome.zarr",
            "sub-01_ses-01_sample-A_desc-nuclei_FLUO.json",
            "sub-01_ses-01_sample-A_desc-nuclei_objects.tsv",
            "sub-01_ses-01_sample-A_desc-nuclei_qc.json",
        ]
        missing = [name for name in expected if not (micr / name).exists()]
        if missing:
            raise SystemExit(f"missing derivatives: {missing}")
        step(f"derivatives complete in {output}; total", started)
        return 0
    finally:
        if scratch.exists():
            for root in (image_root, scratch / "data"):
                if root.exists():
                    set_writable(root, True)
            if options.keep:
                print(f"[container-check] kept {scratch}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
