"""One import package, `outbound`: nothing installed or loaded under the folders' own names."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import outbound

REPOSITORY = Path(__file__).resolve().parent.parent
OLD_NAMES = ("runtime", "actors", "destinations", "benchmarks")


def run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)] if code else [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_public_names_and_version() -> None:
    from outbound import Busy, Config, Destination, Runtime, SendError

    assert {"Runtime", "Config", "SendError", "Destination", "Busy"} <= set(outbound.__all__)
    assert issubclass(Busy, TimeoutError) and issubclass(SendError, ValueError)
    assert Runtime and Config and Destination
    assert outbound.__version__[0].isdigit()


def test_every_module_loads_under_outbound_only(tmp_path: Path) -> None:
    # From a directory outside the repository, as an installed application sees it.
    code = """
        import importlib, importlib.util, json, pkgutil, sys
        import outbound
        loaded = []
        for package in ("outbound", "outbound.actors", "outbound.destinations",
                        "outbound.benchmarks"):
            module = importlib.import_module(package)
            # Subpackages too (each destination is one: outbound.destinations.sql, ...).
            for info in pkgutil.walk_packages(module.__path__, package + "."):
                if info.name.endswith("__main__"):
                    continue
                importlib.import_module(info.name)
                loaded.append(info.name)
        old = ("runtime", "actors", "destinations", "benchmarks")
        print(json.dumps({
            "loaded": loaded,
            "old_loaded": sorted(n for n in sys.modules if n.split(".")[0] in old),
            "old_importable": [n for n in old if importlib.util.find_spec(n) is not None],
        }))
    """
    finished = run_python(code, tmp_path)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert {"outbound.runtime", "outbound.api.app", "outbound.destinations.sql"} <= set(
        report["loaded"]
    )
    assert report["old_loaded"] == []  # no second copy of Config under an old name
    assert report["old_importable"] == []


def test_only_outbound_is_installed_at_the_top_level() -> None:
    import importlib.metadata

    tops = [
        name
        for name, distributions in importlib.metadata.packages_distributions().items()
        if "outbound-runtime" in distributions
    ]
    assert tops == ["outbound"]


def test_python_m_benchmarks_works_from_the_repository_root() -> None:
    finished = run_python("", REPOSITORY, "-m", "benchmarks", "--help")
    assert finished.returncode == 0, finished.stderr
    assert "SCENARIO" in finished.stdout or "scenario" in finished.stdout


def test_outbound_version_and_missing_extra_hint(tmp_path: Path) -> None:
    version = run_python("from outbound.cli import main; main(['--version'])", tmp_path)
    assert version.stdout.strip() == f"outbound {outbound.__version__}"
    # The embedded services' packages made unimportable, as without the extra.
    missing = run_python(
        """
        import sys
        for name in ("moto", "pgserver", "aiosmtpd"):
            sys.modules[name] = None
        from outbound.cli import main
        sys.exit(main(["demo", "--events", "1"]))
        """,
        tmp_path,
    )
    assert missing.returncode == 2, missing.stderr
    assert "pip install 'outbound-runtime[embedded]'" in missing.stderr
    assert "Traceback" not in missing.stderr
