#!/usr/bin/env bash
# The test CA and a server certificate for 127.0.0.1 and localhost, for the test directory and IMAP server:
#   test-ca.sh DIR   writes DIR/ca.pem, DIR/server.pem, DIR/server.key (kept when they are there already)
set -euo pipefail
dir=${1:?directory}
mkdir -p "$dir"
[[ -s $dir/ca.pem && -s $dir/server.pem && -s $dir/server.key ]] && exit 0
cd "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Mailgate test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 -extfile server.ext \
    -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 0644 ca.pem server.pem
chmod 0600 server.key ca.key
