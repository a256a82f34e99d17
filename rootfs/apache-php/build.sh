#!/bin/sh
# Apache 2.4 + mod_php (prefork MPM) from Debian packages, serving phpinfo() at /.
#
# The image runs apache2 directly (no apache2ctl, no shell, no init): image.toml passes the
# variables /etc/apache2/envvars would set. It must start in a container on an overlay rootfs,
# in new pid/net/mount namespaces, with docker's default 14 capabilities and no_new_privs:
# apache2 needs NET_BIND_SERVICE for port 80 and SETUID/SETGID to drop to www-data, and the
# directories that apache2ctl or systemd would create at boot (/run/apache2,
# /run/lock/apache2) must already be in the image.
set -eu
: "${ROOTFS:?ROOTFS must name the empty directory to fill}"
: "${RECIPE_DIR:?}"

SUITE=bookworm
MIRROR=${FCRUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${FCRUN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# The store builds in a root-only directory, out of reach of apt's _apt sandbox user.
# "essential" is the smallest variant that can run maintainer scripts (no apt in the image).
# Documentation, man pages and translations are never unpacked (dpkg path-exclude), but
# copyright files stay, as Debian's licences ask.
mmdebstrap \
    --variant=essential \
    --include=apache2,libapache2-mod-php \
    --aptopt='APT::Install-Recommends "false"' \
    --aptopt='APT::Sandbox::User "root"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    "$SUITE" "$ROOTFS" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main"

echo "configuring apache2"
cd "$ROOTFS"
# prefork, because mod_php is not thread-safe; libapache2-mod-php switches to it on install.
test -e etc/apache2/mods-enabled/mpm_prefork.load
test ! -e etc/apache2/mods-enabled/mpm_event.load
test -e etc/apache2/mods-enabled/php8.2.load

# ServerName and logs to stdout/stderr, where the runtime collects a container's output.
install -m 0644 "$RECIPE_DIR/fcrun.conf" etc/apache2/conf-available/fcrun.conf
chroot . a2enconf -q fcrun
chroot . a2disconf -q other-vhosts-access-log
sed -i 's|^ErrorLog .*|ErrorLog /proc/self/fd/2|' etc/apache2/apache2.conf
sed -i -e 's|^\(\s*\)ErrorLog .*|\1ErrorLog /proc/self/fd/2|' \
       -e 's|^\(\s*\)CustomLog .*|\1CustomLog /proc/self/fd/1 combined|' \
       etc/apache2/sites-available/000-default.conf

# PHP settings for many small instances per host (php-fcrun.ini says why).
install -m 0644 "$RECIPE_DIR/php-fcrun.ini" etc/php/8.2/apache2/conf.d/90-fcrun.ini

# The default site: phpinfo() at /.
rm -f var/www/html/index.html
install -m 0644 "$RECIPE_DIR/index.php" var/www/html/index.php

# What apache2ctl and systemd-tmpfiles would create at start (/var/lock is a link to /run/lock).
mkdir -p run/apache2 run/lock/apache2 var/log/apache2
chroot . chown www-data:www-data /run/lock/apache2

# apache2 -t reads the whole configuration the way the container will run it. It checks that
# the log's directory (/proc/self/fd) exists, so it runs with a /proc of its own, in a mount
# namespace that goes away with it.
unshare --mount --pid --fork --mount-proc="$ROOTFS/proc" chroot . env -i APACHE_RUN_USER=www-data APACHE_RUN_GROUP=www-data \
    APACHE_PID_FILE=/run/apache2/apache2.pid APACHE_RUN_DIR=/run/apache2 \
    APACHE_LOCK_DIR=/var/lock/apache2 APACHE_LOG_DIR=/var/log/apache2 \
    APACHE_START_SERVERS=2 APACHE_MIN_SPARE_SERVERS=2 \
    /usr/sbin/apache2 -t
chroot . /usr/sbin/apache2 -v | head -n 1
chroot . /usr/bin/php -r 'echo "PHP ", PHP_VERSION, "\n";'

# No init system: the container runs apache2 as its first process.
test ! -e lib/systemd/systemd

echo "trimming the image"
rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old var/lib/dpkg/*-old \
       var/log/*.log var/log/apt tmp/* var/tmp/*
# The runtime mounts its own /dev; mmdebstrap leaves device nodes from the build here.
find dev -mindepth 1 -delete
du -sh --apparent-size . | sed 's/\t.*/ image/'
