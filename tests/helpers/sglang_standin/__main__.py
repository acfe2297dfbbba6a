"""`python tests/helpers/sglang_standin [flags]`: runs the stand-in server (see __init__.py)."""
import sys
from pathlib import Path

# Run as a directory, Python puts this folder first on sys.path; the package imports need the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.helpers.sglang_standin.server import main  # noqa: E402

if __name__ == "__main__":
    main()
