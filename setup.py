"""Package discovery: `models/` and `passes/` install as `tilert.models` and `tilert.passes`."""

from setuptools import find_packages, setup

packages = ["tilert", *(f"tilert.{p}" for p in find_packages("tilert"))]
for top in ("models", "passes"):
    packages += [f"tilert.{top}", *(f"tilert.{top}.{p}" for p in find_packages(top))]

setup(packages=packages)
