"""usguide: ultrasound-guided needle targeting, frame by frame.

Not a medical device. Importing the package stays cheap: heavy modules load where they are used.
"""

from usguide._version import __version__
from usguide.frame import Frame, FrameResult, Region

__all__ = ["Frame", "FrameResult", "Region", "__version__"]
