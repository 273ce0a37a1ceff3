import sys

from llmo.quant.tool import main

sys.exit(main())
