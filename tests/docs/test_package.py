"""Packaging promises: the core imports no optional dependency, the public API is complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import shedder

OPTIONAL = (
    "starlette",
    "flask",
    "httpx",
    "prometheus_client",
    "fastapi",
    "werkzeug",
    "anyio",
    "grpc",
    "grpc_health",
    "aiokafka",
    "aio_pika",
    "aiormq",
)


def test_import_shedder_imports_no_optional_dependency() -> None:
    code = (
        "import sys, shedder\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r})\n"
        "print(','.join(loaded))"
    )
    src = str(Path(shedder.__file__).parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src},
    )
    assert result.stdout.strip() == ""


def test_public_api_is_exported_and_typed() -> None:
    for name in shedder.__all__:
        assert hasattr(shedder, name), name
    assert (Path(shedder.__file__).parent / "py.typed").is_file()
    assert shedder.__version__


def test_the_responder_types_are_public() -> None:
    from shedder import HTTPResponse, Overloaded, ShedResponder

    def respond(refusal: Overloaded) -> HTTPResponse:
        return HTTPResponse(503, (("retry-after", str(refusal.retry_after)),), b"busy")

    responder: ShedResponder = respond
    assert responder(Overloaded("queue_full", 2)).headers == (("retry-after", "2"),)


@pytest.mark.parametrize(
    ("module", "dependency", "extra"),
    [("shedder.kafka", "aiokafka", "kafka"), ("shedder.rabbitmq", "aio_pika", "rabbitmq")],
)
def test_missing_broker_client_names_the_extra(module: str, dependency: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{dependency!r}] = None\n"
        f"try:\n    import {module}\n"
        "except ImportError as exc:\n    print(exc, exc.__suppress_context__)"
    )
    src = str(Path(shedder.__file__).parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}
    )
    assert f'pip install "loadshedder[{extra}]"' in result.stdout, result.stderr
    assert result.stdout.strip().endswith("True")  # raised `from None`
