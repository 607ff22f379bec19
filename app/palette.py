"""One colour-blind-safe palette for every figure, with a fixed colour per exit and per expert.

Okabe & Ito's eight colours first (safe for the common colour-vision deficiencies), then Paul
Tol's muted scheme for models with more exits or experts than that.
"""

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
TOL_MUTED = (
    "#332288",
    "#88CCEE",
    "#44AA99",
    "#117733",
    "#999933",
    "#DDCC77",
    "#CC6677",
    "#882255",
    "#AA4499",
)
CORRECT = "#009E73"
WRONG = "#D55E00"
# Exits and experts never reuse the correct/wrong colours, so a green bar always means "right".
CATEGORICAL = tuple(c for c in OKABE_ITO if c not in (CORRECT, WRONG)) + TOL_MUTED

NEUTRAL = "#7F7F7F"
HIGHLIGHT = "#E69F00"
SEQUENTIAL = "Viridis"  # perceptually uniform and colour-blind safe, for heatmaps
DIVERGING = "RdBu"
# A marker outlined in both shows on any cell of a heatmap, from darkest to brightest.
OUTLINE_DARK = "#000000"
OUTLINE_LIGHT = "#FFFFFF"


def exit_color(k: int) -> str:
    """The colour of exit ``k`` on every page."""
    return CATEGORICAL[k % len(CATEGORICAL)]


def expert_color(e: int) -> str:
    """The colour of expert ``e`` on every page."""
    return CATEGORICAL[e % len(CATEGORICAL)]
