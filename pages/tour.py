"""Guided tour: what dynamic networks do, one chapter per family (app/tour/ holds the content).

URL: ``?chapter=<key>`` opens a chapter, ``?present=1`` the presenter view (app/tour/frame.py).
"""

from app import navigation
from app.tour.frame import main

navigation.require_router()  # first: a deep link may have run this page alone
main()
