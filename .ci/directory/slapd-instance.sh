#!/usr/bin/env bash
# One OpenLDAP slapd with the test directory (directory.ldif), on loopback only:
#   slapd-instance.sh start DIR LDAP_PORT LDAPS_PORT TLS_DIR   ldap:// (StartTLS offered) and ldaps://
#   slapd-instance.sh stop DIR
# DIR holds its configuration, database and pid file; TLS_DIR the test CA (ca.pem) and the server's certificate
# (server.pem, server.key) for 127.0.0.1 and localhost. The database is loaded from directory.ldif with slapadd
# before the server starts, so every start begins with the same directory. .ci/services.sh starts the shared
# one; a test that must see the directory go away starts its own with this script and stops it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
action=${1:?start or stop}
dir=${2:?directory}

stop() {
    local pid i
    [[ -s $dir/slapd.pid ]] || return 0
    pid="$(cat "$dir/slapd.pid")"
    kill "$pid" 2>/dev/null || { rm -f "$dir/slapd.pid"; return 0; }
    for ((i = 0; i < 80; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$dir/slapd.pid"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/slapd.pid"
}

case $action in
stop) stop ;;
start)
    ldap_port=${3:?LDAP port} ldaps_port=${4:?LDAPS port} tls=${5:?TLS directory}
    stop
    rm -rf "$dir/db"
    mkdir -p "$dir/db"
    cp "$HERE/mailgate-test.schema" "$dir/"
    cat >"$dir/slapd.conf" <<CONF
# Written by .ci/directory/slapd-instance.sh: the test directory.
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
include $dir/mailgate-test.schema
pidfile $dir/slapd.pid
argsfile $dir/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile $tls/ca.pem
TLSCertificateFile $tls/server.pem
TLSCertificateKeyFile $tls/server.key
# Simple binds with a password only inside TLS (StartTLS or LDAPS), as a directory should be run.
security simple_bind=128

database mdb
maxsize 67108864
suffix "dc=example,dc=edu"
rootdn "cn=admin,dc=example,dc=edu"
rootpw admin-test-secret
directory $dir/db
index objectClass eq
index uid,mail,mailAlternateAddress,proxyAddresses eq
index member eq
# Nobody searches anonymously: the gateway binds as its service account; a person may read their own entry.
access to attrs=userPassword by anonymous auth by self write by * none
access to * by dn.exact="cn=mailgate,ou=services,dc=example,dc=edu" read by self read by * none
CONF
    slapadd -q -f "$dir/slapd.conf" -l "$HERE/directory.ldif"
    # Its own output to a file: a daemon that kept the caller's stdout would hold a pipe open forever.
    slapd -f "$dir/slapd.conf" -h "ldap://127.0.0.1:$ldap_port/ ldaps://127.0.0.1:$ldaps_port/" \
        </dev/null >>"$dir/slapd.out" 2>&1
    for ((i = 0; i < 100; i++)); do
        if LDAPTLS_CACERT="$tls/ca.pem" ldapwhoami -x -ZZ -H "ldap://127.0.0.1:$ldap_port" \
            -D "cn=mailgate,ou=services,dc=example,dc=edu" -w gateway-bind-secret >/dev/null 2>&1; then
            exit 0
        fi
        sleep 0.1
    done
    echo "slapd did not answer on 127.0.0.1:$ldap_port" >&2
    exit 1
    ;;
*) echo "usage: $0 start DIR LDAP_PORT LDAPS_PORT TLS_DIR | stop DIR" >&2; exit 2 ;;
esac
