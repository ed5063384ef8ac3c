"""The package list that pyproject.toml cannot say: ``conf/`` (the Hydra configs, at the checkout's root where
Hydra users look for them) ships inside the package as ``wordlm/conf``, so an installed wordlm runs from any
folder. ``wordlm.config.conf_dir`` finds either."""

from setuptools import find_namespace_packages, find_packages, setup

conf = ["wordlm.conf", *("wordlm.conf." + p for p in find_namespace_packages("conf"))]
setup(packages=[*find_packages(include=["wordlm", "wordlm.*"]), *conf],
      package_dir={"wordlm.conf": "conf"},
      package_data={p: ["*.yaml"] for p in conf})
