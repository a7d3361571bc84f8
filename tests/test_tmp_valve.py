from gateway.scheduler.prefix_pins import PrefixPins
PrefixPins.release_oldest = lambda self: None
from test_sessions import *  # noqa
