"""The demo and the overload benchmark: target apps, load generator, server harness, report.

Not public API. Shipped inside the package so that an installed ``shedder demo`` works without
the repository. Only this package and ``shedder.__main__`` import the ``demo`` extra (uvicorn,
gunicorn, rich, matplotlib, psutil, flask), and only when they run.
"""
