"""`python -m opd_verl.demo`: build the CPU demo (cached), run OPD through main_opd, evaluate, plot."""

import sys

from opd_verl.demo.main import main

sys.exit(main())
