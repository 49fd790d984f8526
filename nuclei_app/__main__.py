import sys

from nuclei_app.cli import main

sys.exit(main())
