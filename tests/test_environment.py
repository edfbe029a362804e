"""constraints.txt pins the environment that reproduces pipelines/dvc.lock: it must agree with
pyproject.toml, and agd must say, in `agd env` and on every MLflow run, whether it is the one installed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from agd import environment
from agd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def project_requirements(extras: tuple[str, ...] = ("test",)) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    for extra in extras:
        requirements += [Requirement(text) for text in project["optional-dependencies"][extra]]
    return requirements


def test_read_constraints_rejects_ranges_repeats_and_bad_versions(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# header\nnumpy==2.0.0  # note\nPyYAML==6.0\n")
    assert environment.read_constraints(path) == {"numpy": Version("2.0.0"), "pyyaml": Version("6.0")}
    for text, message in [
        ("numpy>=2\n", "line 1: 'numpy>=2' is not an exact pin"),
        ("numpy==2.0.0\nNumPy==2.1.0\n", "line 2: NumPy is pinned twice"),
        ("\nnumpy==two\n", "line 2: 'two' is not a version"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            environment.read_constraints(path)


def test_every_dependency_is_pinned_inside_its_range():
    pins = environment.read_constraints(ROOT / "constraints.txt")
    assert "agd" not in pins, "the project itself is installed editable, not pinned"
    problems = []
    for requirement in project_requirements():
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{requirement.name}: not pinned")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{requirement.name}: pinned {pinned}, pyproject asks {requirement.specifier}")
    assert not problems, "constraints.txt disagrees with pyproject.toml:\n" + "\n".join(problems)


def test_ci_and_readme_install_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "-c constraints.txt" in ci
    assert "-c constraints.txt" in readme.split("```", 2)[1], (
        "the README's first command installs with the pins"
    )


def test_mismatches_name_each_package_at_another_version_key_packages_first():
    pins = {
        "zeta": Version("1.0"),
        "numpy": Version("2.4.6"),
        "torch": Version("2.13.0"),
        "absent": Version("1.0"),
        "alpha": Version("3.0+cpu"),
    }
    installed = {"zeta": "1.1", "numpy": "2.4.5", "torch": "2.13.0+cpu", "alpha": "3.0+cu121"}
    found = environment.mismatches(pins, installed)
    # torch 2.13.0+cpu satisfies a pin without a local label; a pin with one must match it; absent is no mismatch
    assert [str(m) for m in found] == [
        "numpy 2.4.5 (pinned 2.4.6)",
        "alpha 3.0+cu121 (pinned 3.0+cpu)",
        "zeta 1.1 (pinned 1.0)",
    ]
    assert (
        environment.mismatches(pins, {**installed, "numpy": "2.4.6", "zeta": "1.0", "alpha": "3.0+cpu"}) == []
    )


def test_constraints_status_summarises_in_one_line(tmp_path):
    path = tmp_path / "constraints.txt"
    assert environment.constraints_status(path, {}).startswith("no constraints.txt at ")
    path.write_text("".join(f"p{i}==1.0\n" for i in range(7)))
    assert environment.constraints_status(path, {"p0": "1.0"}) == "match"
    status = environment.constraints_status(path, {f"p{i}": "2.0" for i in range(7)})
    assert status.startswith("7 differ: p0 2.0 (pinned 1.0), ") and status.endswith(", and 2 more")
    path.write_text("p0>=1\n")
    assert environment.constraints_status(path, {}).startswith("unreadable: constraints.txt line 1")


def test_agd_env_lists_differences_and_check_fails_on_them(tmp_path, capsys):
    installed = environment.installed_versions()
    path = tmp_path / "c.txt"
    path.write_text(f"numpy=={installed['numpy']}\npytest==0.0.1\n")
    assert main(["env", "--constraints", str(path)]) == 0  # a report, not a failure, without --check
    out = capsys.readouterr().out
    assert f"numpy                  {installed['numpy']}" in out
    assert f"1 installed package differs from {path}:\n  pytest {installed['pytest']} (pinned 0.0.1)" in out
    assert main(["env", "--check", "--constraints", str(path)]) == 1
    path.write_text(f"numpy=={installed['numpy']}\n")
    assert main(["env", "--check", "--constraints", str(path)]) == 0
    assert "at its pinned version" in capsys.readouterr().out
    assert main(["env", "--constraints", str(tmp_path / "missing.txt")]) == 2


def test_every_stage_run_carries_the_environment_tags(tmp_path, monkeypatch):
    import mlflow

    from agd.tracking.mlflow import stage_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run("probe", tags={"agd.env.python": "kept: a caller's tag wins"}) as run:
        run_id = run.info.run_id
    tags = mlflow.MlflowClient(uri).get_run(run_id).data.tags
    installed = environment.installed_versions()
    assert tags["agd.env.torch"] == installed["torch"] and tags["agd.env.pyarrow"] == installed["pyarrow"]
    assert tags["agd.env.constraints"] == environment.constraints_status(environment.constraints_path(ROOT))
    assert tags["agd.env.python"] == "kept: a caller's tag wins"
    assert tags["agd.env.cpu"].startswith(environment.cpu_model())


def test_the_record_names_the_vector_isa_and_the_kernel_settings_in_force(monkeypatch):
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    expected = "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "other"
    assert environment.vector_isa() == (expected if flags else "unknown")
    environment.environment_record.cache_clear()
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    try:
        record = environment.environment_record()
        assert record["kernel_settings"]["MKL_CBWR"] == "AVX2"
        assert record["kernel_settings"]["ATEN_CPU_CAPABILITY"] is None
        assert "MKL_CBWR=AVX2" in environment.environment_tags()["agd.env.kernels"]
    finally:
        environment.environment_record.cache_clear()
