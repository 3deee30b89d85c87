#!/usr/bin/env bash
# Prepares a Debian 12 machine for the tests, the demo and the benchmark; sourced by
# tests/run-all, tests/demo, tests/demo-oauth2 and tests/bench/run. As root it installs what the integration tests need and is missing (real
# Dovecot, Postfix, the reference clients, Node.js and the OAuth2 authorization server
# oidc-provider from npm), creates the unprivileged mail user, and
# finds cargo. When everything is installed it only checks. The system's own mail
# services are never started or configured: tests and demo run private instances in /tmp.

MAIL_USER=lmp-test # keep in sync with MAIL_USER in tests/common/mod.rs
PACKAGES=(
    build-essential libssl-dev pkg-config ca-certificates
    dovecot-imapd dovecot-pop3d dovecot-lmtpd postfix
    dovecot-submissiond # the benchmark's Dovecot gateway (submission_relay_*)
    xinetd systemd swaks libnet-ssleay-perl libio-socket-ssl-perl fetchmail curl openssl time python3
    debhelper lintian # the Debian package (packaging/build-deb, tests/package.rs)
    mmdebstrap systemd-container # the real systemd in a container (tests/systemd.rs)
    # Libraries of the extracted (not installed) servers below: setuid binaries ignore
    # LD_LIBRARY_PATH, so these must be real installed packages. Exim (heavy build):
    libmariadb3 libspf2-2 libpq5 libperl5.36 libldap-2.5-0 libsasl2-2 libidn12
    # Cyrus IMAP (its own libcyrus* come from the unpacked cyrus-common, via LD_LIBRARY_PATH),
    # and sasl2-bin/libsasl2-modules for its sasldb accounts:
    libclamav12 libical3 libicu72 libjansson4 libxapian30 libzephyr4 libwrap0 libsqlite3-0
    libpcre3 libxml2 libkrb5-3 sasl2-bin libsasl2-modules
    libcourier-unicode4 libltdl7 libgamin0 # Courier IMAP (libgamin0 provides libfam0)
    libevent-dev bison zlib1g-dev # OpenSMTPD, built from source below
)

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: the tests start real Dovecot and Postfix and must run as root:" >&2
    echo "  sudo $0 $*" >&2
    exit 1
fi

installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
# The OAuth2 tests' authorization server runs on Node.js. The machine image may bring its
# own Node.js (then the commands exist and nothing is installed); otherwise Debian's.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    missing+=(nodejs npm)
fi

if ((${#missing[@]} > 0)); then
    echo "setup: installing ${missing[*]}" >&2
    # Package scripts would start the system's Dovecot and Postfix on 0.0.0.0; a
    # policy-rc.d that exits 101 forbids that. Only ours is removed again.
    created_policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # No system Postfix configuration: the tests bring their own (postfix -c DIR).
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
    # The packages enable their system services for the next boot; the tests never use
    # them, and a system Dovecot would listen on every interface and take port 110.
    for service in dovecot postfix xinetd; do
        if command -v systemctl >/dev/null; then
            systemctl disable "$service" >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null; then
            update-rc.d "$service" disable >/dev/null 2>&1 || true
        fi
    done
    if [[ -n $created_policy ]]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
fi

# oidc-provider (the OAuth2 tests' authorization server, tests/oauth2/) from npm, exactly as
# pinned by its package-lock.json, into a cache outside the repository named after the hash
# of package.json + package-lock.json (keep in sync with idp_modules_dir() in
# tests/common/oauth2.rs). Installed once per lock file; a finished install is marked by
# .lmp-installed, so an interrupted one is redone.
idp_src=$(cd "$(dirname "${BASH_SOURCE[0]}")/oauth2" && pwd)
idp_hash=$(cd "$idp_src" && cat package.json package-lock.json | sha256sum | cut -c1-16)
idp_dir=${LMP_IDP_CACHE:-/var/cache/legacy-mail-proxy-test}/idp-$idp_hash
if [[ ! -e $idp_dir/node_modules/.lmp-installed ]]; then
    echo "setup: installing oidc-provider into $idp_dir (npm ci)" >&2
    rm -rf "$idp_dir"
    mkdir -p "$idp_dir"
    cp "$idp_src/package.json" "$idp_src/package-lock.json" "$idp_dir/"
    (cd "$idp_dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    touch "$idp_dir/node_modules/.lmp-installed"
fi

# Extra servers of the server matrix (issue 13) conflict with the ones above (Exim with
# Postfix as mail-transport-agent; Cyrus and Courier with dovecot-imapd as imap-server), so
# they are never installed: their .debs are downloaded and unpacked into a cache, and the
# harness runs the binaries from there (tests/common/exim.rs). Unpacked once per package
# list; a finished unpack is marked by .lmp-extracted, so an interrupted one is redone.
# Keep the directory names in sync with extracted_server_root() in tests/common/mod.rs.
server_cache=${LMP_SERVER_CACHE:-/var/cache/legacy-mail-proxy-test}/servers
extract_server() {
    local name=$1
    shift
    local root=$server_cache/$name
    [[ -e $root/.lmp-extracted && $(cat "$root/.lmp-extracted") == "$*" ]] && return 0
    echo "setup: unpacking $* into $root (apt-get download + dpkg -x, not installed)" >&2
    rm -rf "$root" "$root.debs"
    mkdir -p "$root.debs"
    chown _apt "$root.debs" 2>/dev/null || true # apt downloads as _apt when it can
    (cd "$root.debs" && apt-get download "$@") || {
        apt-get update && (cd "$root.debs" && apt-get download "$@")
    }
    for deb in "$root.debs"/*.deb; do
        dpkg -x "$deb" "$root"
    done
    rm -rf "$root.debs"
    echo "$*" >"$root/.lmp-extracted"
}
extract_server exim4 exim4-daemon-heavy exim4-base exim4-config
extract_server cyrus cyrus-imapd cyrus-common
extract_server courier courier-imap courier-base courier-authlib courier-authdaemon \
    courier-authlib-userdb
# Courier-authlib's paths are compiled in and machine-wide; tests/common/courier.rs runs
# it in a private mount namespace with its own directories bound over these empty mount
# points (keep in sync with MOUNT_POINTS there). Nothing is mounted on the host itself.
mkdir -p /etc/courier /run/courier /usr/lib/courier-authlib
# OpenSMTPD: Debian 12's 6.8.0p2 cannot do TLS with OpenSSL 3 (every handshake fails with
# "EVP lib": upstream OpenSMTPD#1171, #1239), so 7.6.0p1, Debian 13's, is built from its
# source once (about 35 s of CPU) into the cache. Its queue, socket and pid-file paths are
# compiled in; tests/common/opensmtpd.rs runs it in a private mount namespace with its own
# directories bound over these empty mount points, so runs never share a queue.
opensmtpd_version=7.6.0p1
mkdir -p /var/spool/lmp-opensmtpd /run/lmp-opensmtpd /var/empty
for user in opensmtpd opensmtpq; do
    if ! getent passwd $user >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /var/empty \
            --shell /usr/sbin/nologin $user
    fi
done
opensmtpd_root=$server_cache/opensmtpd
if [[ ! -e $opensmtpd_root/.lmp-built || $(cat "$opensmtpd_root/.lmp-built") != "$opensmtpd_version" ]]; then
    echo "setup: building OpenSMTPD $opensmtpd_version into $opensmtpd_root" >&2
    build=$(mktemp -d)
    tarball=opensmtpd_$opensmtpd_version.orig.tar.gz
    curl -fsS -o "$build/$tarball" "http://deb.debian.org/debian/pool/main/o/opensmtpd/$tarball"
    echo "b27c806982a6653a2637f810ae7a45372b9a7ff99350ee1003746503ff0e4a97  $build/$tarball" |
        sha256sum -c --quiet
    tar -xzf "$build/$tarball" -C "$build"
    (
        cd "$build/opensmtpd-$opensmtpd_version" &&
            ./configure --prefix="$opensmtpd_root" \
                --with-path-queue=/var/spool/lmp-opensmtpd \
                --with-path-socket=/run/lmp-opensmtpd --with-path-pidfile=/run/lmp-opensmtpd \
                --with-path-empty=/var/empty \
                --with-user-smtpd=opensmtpd --with-user-queue=opensmtpq \
                --with-group-queue=opensmtpq >"$build/configure.log" &&
            make -j"$(nproc)" >"$build/make.log" 2>&1 &&
            rm -rf "$opensmtpd_root" && make install >"$build/install.log" 2>&1
    ) || {
        echo "setup: building OpenSMTPD failed; logs in $build" >&2
        exit 1
    }
    echo "$opensmtpd_version" >"$opensmtpd_root/.lmp-built"
    rm -rf "$build"
fi
# Exim's binary refuses to run (even --version) without its compiled-in user.
if ! getent passwd Debian-exim >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin Debian-exim
fi
# Cyrus's processes switch to its compiled-in user `cyrus` (group mail, as Debian's package).
if ! getent passwd cyrus >/dev/null; then
    useradd --system --gid mail --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin cyrus
fi

if ! getent passwd "$MAIL_USER" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$MAIL_USER"
fi

# Under sudo, PATH usually lacks the invoking user's ~/.cargo/bin: use their toolchain.
if ! command -v cargo >/dev/null && [[ -n ${SUDO_USER:-} ]]; then
    user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    if [[ -x $user_home/.cargo/bin/cargo ]]; then
        export PATH="$user_home/.cargo/bin:$PATH"
        export CARGO_HOME=${CARGO_HOME:-$user_home/.cargo}
        export RUSTUP_HOME=${RUSTUP_HOME:-$user_home/.rustup}
    fi
fi
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust from https://rustup.rs" >&2
    exit 1
fi

