"""The sweep tools live in tools/ (scripts, not a package): put that folder on sys.path for these tests."""
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
