# Sourced by bin/quickstart and bin/test (from the repository root): `ensure_venv EXTRA` creates
# .venv if missing and installs the project with EXTRA unless every requirement it names in
# pyproject.toml (the project's own and EXTRA's) is installed already, so a .venv made for one
# script (or before a dependency was added) gets what the other needs.

ensure_venv() {
  local extra="$1"
  if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv (first run only)..." >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
  fi
  if ! .venv/bin/python - "$extra" <<'PY'
import importlib.metadata as metadata
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
wanted = [project["name"], *project["dependencies"]]
wanted += project["optional-dependencies"][sys.argv[1]]
for requirement in wanted:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
PY
  then
    echo "Installing the platform with its '$extra' extras into .venv..." >&2
    .venv/bin/pip install --quiet -e ".[$extra]"
  fi
}
