import sys

from mpiring.bench import main

sys.exit(main())
