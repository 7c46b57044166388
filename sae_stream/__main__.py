from sae_stream.cli import main

raise SystemExit(main())
