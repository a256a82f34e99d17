<?php
// The demo app of scripts/demo.sh: served by Apache + mod_php in an fcrun container that
// `fcrun serve` starts on the first request and stops when idle.
header('Content-Type: text/plain');
printf("Hello from %s (PHP %s, pid %d in its own pid namespace)\n", gethostname(), PHP_VERSION, getmypid());
