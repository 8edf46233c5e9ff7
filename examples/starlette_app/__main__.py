"""``python -m examples.starlette_app [--host H] [--port P]``: serve the example under uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from .app import app


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the shedder Starlette example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
