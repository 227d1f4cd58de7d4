from nbd_uring.cli import main

raise SystemExit(main())
