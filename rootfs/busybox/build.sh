#!/bin/sh
# A minimal rootfs from the host's busybox-static: one static binary, its applets as symlinks,
# the users Apache-style images expect, and empty mount points for the runtime.
set -eu
: "${ROOTFS:?ROOTFS must name the empty directory to fill}"

BUSYBOX=/bin/busybox
# A dynamically linked busybox would need the host's libc in the image.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "error: $BUSYBOX is dynamically linked; install Debian's busybox-static" >&2
    exit 1
fi

cd "$ROOTFS"
mkdir -p bin sbin usr/bin usr/sbin etc root tmp var/tmp proc sys dev run
chmod 0700 root
chmod 1777 tmp var/tmp
install -m 0755 "$BUSYBOX" bin/busybox

# --list-full prints each applet with its usual directory: bin/sh, usr/bin/wget, sbin/ip.
count=0
for applet in $("$BUSYBOX" --list-full); do
    case "$applet" in bin/busybox) continue ;; esac
    ln -sf /bin/busybox "$applet"
    count=$((count + 1))
done
echo "busybox $("$BUSYBOX" | head -n 1 | cut -d' ' -f2) with $count applets"

cat > etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/var/www:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > etc/group <<'GROUP'
root:x:0:
www-data:x:33:
nogroup:x:65534:
GROUP
# A default; the runtime may bind-mount its own /etc/hosts and /etc/resolv.conf over it.
cat > etc/hosts <<'HOSTS'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
HOSTS
chmod 0644 etc/passwd etc/group etc/hosts
