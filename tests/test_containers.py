"""The container recipes, checked without a container engine.

The Dockerfile and apptainer.def are parsed (with the parser `make container-check` uses to
replay them): entry point, non-root user, pinned install steps identical to pyproject.toml
and constraints.txt for both torch variants (the recipes' install commands run in bash with
`python` and `rm` stubbed, so the shell's own `case` picks the wheel index), labels, the environment that makes the image read-only-safe, and the
variables `nuclei_app.bids_app.container_info` reads for provenance.
"""

from __future__ import annotations

import importlib.util
import json
import re
import os
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from nuclei_app import __version__

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check_tool():
    """tools/container_check.py, the replay behind `make container-check`."""
    spec = importlib.util.spec_from_file_location("container_check", REPO / "tools" / "container_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dockerfile(check_tool):
    return check_tool.dockerfile_instructions(REPO / "Dockerfile")


@pytest.fixture(scope="module")
def apptainer_sections() -> dict[str, list[str]]:
    """Header lines under "" and every %section's lines, comments dropped."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for raw in (REPO / "apptainer.def").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections[current] = []
            continue
        sections[current].append(line)
    return sections


def _pins() -> dict[str, str]:
    """Exact pins of pyproject.toml's dependencies (``name==version``)."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(item.replace(" ", "").split("==") for item in dependencies if "==" in item)


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


#: TORCH_VARIANT -> the index options of the torch install step (the package step uses PyPI).
VARIANTS = {"cuda": [], "cpu": ["--index-url", "https://download.pytorch.org/whl/cpu"]}

#: Stand-ins for the recipe's commands: `python -m pip install ARGS` prints ARGS (one line, unit
#: separated), `rm` does nothing; everything else (case, exports) runs as written.
_STUBS = """set -e
python() { [ "$1 $2 $3" = "-m pip install" ] || exit 97; shift 3; printf '%s\\037' "$@"; printf '\\n'; }
rm() { :; }
"""


def _render(script: str, variant: str) -> str:
    """The recipe text with its build argument given (Docker's ${...}, Apptainer's {{ ... }})."""
    return script.replace("${TORCH_VARIANT}", variant).replace("{{ TORCH_VARIANT }}", variant)


def _shell_installs(script: str, variant: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", _STUBS + _render(script, variant)], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})


def _pip_installs(script: str, variant: str) -> list[list[str]]:
    """The argument lists of every `python -m pip install ...` the recipe runs for ``variant``."""
    result = _shell_installs(script, variant)
    assert result.returncode == 0, result.stderr
    return [line.split("\x1f")[:-1] for line in result.stdout.splitlines()]


def _dockerfile_script(dockerfile) -> str:
    return "\n".join(args for keyword, args in dockerfile if keyword == "RUN" and "pip install" in args)


def _check_install_steps(installs: list[list[str]], variant: str) -> None:
    assert len(installs) == 2, installs
    pins, constraints = _pins(), _constraints()
    assert pins == {"torch": "2.14.1", "torchvision": "0.29.1"}  # what the recipes and the docs promise
    index = VARIANTS[variant]
    torch_step, package_step = installs
    assert torch_step[: len(index)] == index, torch_step  # only the torch step changes index
    torch_step = torch_step[len(index) :]
    for arguments in (torch_step, package_step):
        assert arguments[:2] == ["-c", "/opt/nuclei-app/constraints.txt"], arguments  # every step is constrained
        for requirement in arguments[2:]:
            if "==" in requirement:
                name, version = requirement.split("==")
                assert pins.get(name) == version == constraints[name], requirement
            else:
                assert requirement == "/opt/nuclei-app/src", requirement  # the package from the repository
    assert sorted(torch_step[2:]) == sorted(f"{name}=={version}" for name, version in pins.items())
    assert package_step == ["-c", "/opt/nuclei-app/constraints.txt", "/opt/nuclei-app/src"]


def test_dockerfile_base_entrypoint_and_user(dockerfile):
    keywords = [keyword for keyword, _ in dockerfile]
    assert dict(dockerfile)["FROM"] == "python:3.11-slim"
    assert json.loads(dict(dockerfile)["ENTRYPOINT"]) == ["nuclei-app"]
    users = [args for keyword, args in dockerfile if keyword == "USER"]
    assert users == ["nuclei:nuclei"]
    # the user exists (created before USER) and is not root
    creation = [args for keyword, args in dockerfile if keyword == "RUN" and "useradd" in args]
    assert len(creation) == 1 and "--uid 1000" in creation[0] and creation[0].rstrip().endswith(" nuclei")
    assert keywords.index("USER") > keywords.index("RUN")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert "HEALTHCHECK" not in keywords and "EXPOSE" not in keywords  # a batch tool: no service, no probe


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dockerfile_install_steps_match_pyproject_pins(dockerfile, variant):
    _check_install_steps(_pip_installs(_dockerfile_script(dockerfile), variant), variant)

def test_dockerfile_copies_and_torch_variant_argument(dockerfile, check_tool):
    arguments = dict(args.partition("=")[::2] for keyword, args in dockerfile if keyword == "ARG")
    assert arguments["TORCH_VARIANT"] == "cuda"  # the default image works on GPUs too
    refused = _shell_installs(_dockerfile_script(dockerfile), "rocm")
    assert refused.returncode == 64 and "TORCH_VARIANT must be cuda or cpu" in refused.stderr
    assert not refused.stdout  # nothing installed
    env = _dockerfile_env(dockerfile, check_tool)
    assert env["NUCLEI_APP_TORCH_VARIANT"] == "cuda"
    copies = [shlex.split(args) for keyword, args in dockerfile if keyword == "COPY"]
    assert ["constraints.txt", "/opt/nuclei-app/constraints.txt"] in copies
    copied = {source for *sources, _ in copies for source in sources}
    assert copied == {"constraints.txt", "pyproject.toml", "README.md", "nuclei_app"}
    # the constraints are in place before the first install
    order = [keyword if keyword != "COPY" else "COPY " + args for keyword, args in dockerfile]
    assert order.index("COPY constraints.txt /opt/nuclei-app/constraints.txt") < order.index("RUN")


def test_dockerfile_labels_and_version(dockerfile, check_tool):
    arguments = {}
    for keyword, args in dockerfile:
        if keyword == "ARG":
            name, _, default = args.partition("=")
            arguments[name] = default
    assert arguments["VERSION"] == __version__
    labels = {}
    for keyword, args in dockerfile:
        if keyword == "LABEL":
            labels.update(check_tool.parse_pairs(args))
    for key in ("title", "version", "source", "licenses", "description"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert check_tool.substitute(labels["org.opencontainers.image.version"], arguments) == __version__
    assert labels["org.opencontainers.image.licenses"] == tomllib.loads((REPO / "pyproject.toml").read_text())[
        "project"]["license"]["text"]


def _dockerfile_env(dockerfile, check_tool) -> dict[str, str]:
    variables = {}
    for keyword, args in dockerfile:
        if keyword == "ARG":
            name, _, default = args.partition("=")
            variables[name] = default
    env = {}
    for keyword, args in dockerfile:
        if keyword == "ENV":
            for key, value in check_tool.parse_pairs(args).items():
                env[key] = variables[key] = check_tool.substitute(value, variables)
    return env


def test_dockerfile_writes_only_to_tmp_and_declares_its_container(dockerfile, check_tool, tmp_path):
    from nuclei_app.bids_app.derivatives import container_info

    env = _dockerfile_env(dockerfile, check_tool)
    for variable in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR", "TORCH_HOME",
                     "DASK_TEMPORARY_DIRECTORY"):
        assert env[variable] == "/tmp" or env[variable].startswith("/tmp/"), variable
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # no .pyc written into the read-only image
    assert dict(dockerfile)["WORKDIR"] == "/tmp"
    assert container_info(env, dockerenv=tmp_path / "absent") == {"Type": "docker", "Tag": f"nuclei-app:{__version__}"}


def test_dockerignore_keeps_exactly_what_the_image_copies():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "**"  # everything else (.venv, data, outputs) stays out of the build context
    assert {p[1:].rstrip("/") for p in patterns if p.startswith("!")} == {
        "pyproject.toml", "README.md", "constraints.txt", "nuclei_app"}


def test_apptainer_builds_the_same_environment(apptainer_sections, dockerfile):
    header = dict(line.split(":", 1) for line in apptainer_sections[""])
    assert header["Bootstrap"].strip() == "docker"
    assert header["From"].strip() == dict(dockerfile)["FROM"]  # same base as the Dockerfile
    arguments = dict(line.split("=", 1) for line in apptainer_sections["arguments"])
    assert arguments == {"TORCH_VARIANT": "cuda"}  # the same default as the Dockerfile
    post = "\n".join(apptainer_sections["post"])
    for variant in VARIANTS:
        _check_install_steps(_pip_installs(post, variant), variant)
        docker_installs = _pip_installs(_dockerfile_script(dockerfile), variant)
        assert _pip_installs(post, variant) == docker_installs  # the very same commands
    refused = _shell_installs(post, "rocm")
    assert refused.returncode == 64 and "TORCH_VARIANT must be cuda or cpu" in refused.stderr
    files = {tuple(line.split()) for line in apptainer_sections["files"]}
    assert ("constraints.txt", "/opt/nuclei-app/constraints.txt") in files
    assert {source for source, _ in files} == {"constraints.txt", "pyproject.toml", "README.md", "nuclei_app"}
    assert apptainer_sections["runscript"] == ['exec nuclei-app "$@"']
    labels = dict(line.split(None, 1) for line in apptainer_sections["labels"])
    assert labels["org.opencontainers.image.version"] == __version__


def test_apptainer_environment_and_self_test(apptainer_sections, tmp_path, run_cli):
    from nuclei_app.bids_app.derivatives import container_info

    env = {}
    for line in apptainer_sections["environment"]:
        for token in shlex.split(line)[1:]:  # export K=V K2=V2
            key, _, value = token.partition("=")
            env[key] = value
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    assert env["NUCLEI_APP_CONTAINER_TAG"] == f"nuclei-app:{__version__}"
    # the runtime sets APPTAINER_CONTAINER; the recipe's own variables say the same
    assert container_info(env, dockerenv=tmp_path / "absent") == {"Type": "apptainer", "Tag": f"nuclei-app:{__version__}"}
    test_lines = " ".join(apptainer_sections["test"])
    assert "nuclei-app --version" in test_lines
    segment = re.search(r"nuclei-app segment (.+?)(?:test -f|$)", test_lines).group(1)
    assert "--method weak" in segment and "-o " in segment
    # every option the self-test passes exists in this version's CLI
    help_text = run_cli("segment", "--help").stdout
    for option in re.findall(r"(--[a-z-]+)", segment):
        assert option in help_text, option
