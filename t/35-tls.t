#!/usr/bin/perl

# TLS to the provider: with "ratepool_pass https://pool" every key's
# requests go out over TLS with that key's host as SNI and Host, the
# provider's certificate is always verified (against the system's CAs
# unless ssl_trusted_certificate= names others),
# a 429 is re-routed over TLS with the same body, and a key whose server
# does not prove its identity never gets a request, so its secret and the
# client's prompt never reach that server.
#
# The "provider" is a TLS front in the same nginx (certificates made here
# with the openssl command line, from a throwaway CA) that proxies to the
# mock provider and tells it, in request headers, which SNI and Host it
# saw.  Only names that resolve without DNS and without touching
# /etc/hosts are used: "localhost" (a DNS name, so it is sent as SNI) and
# "127.0.0.1" (an IP literal, which RFC 6066 keeps out of SNI; the
# certificate is still checked against it).

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep);

use Ratepool::Test;

my $t = Ratepool::Test->new;

*random_hex = \&Ratepool::Test::random_hex;

my $dir = $t->testdir;

# --- certificates ------------------------------------------------------------

plan skip_all => 'no openssl command line'
    unless system('openssl version >/dev/null 2>&1') == 0;

sub openssl {
    my (@args) = @_;
    my $pid = fork // die "fork: $!\n";

    if (!$pid) {
        chdir $dir or POSIX::_exit(126);
        open STDOUT, '>>', "$dir/openssl.log" or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        exec 'openssl', @args or POSIX::_exit(127);
    }

    waitpid $pid, 0;
    die "openssl @args failed:\n"
        . do { local $/; open my $fh, '<', "$dir/openssl.log"; <$fh> // '' }
        if $?;
}

my @EC = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
          '-nodes');

sub make_ca {
    my ($name, $cn) = @_;
    openssl('req', '-x509', @EC, '-keyout', "$name.key", '-out', "$name.crt",
            '-days', 2, '-subj', "/CN=$cn",
            '-addext', 'basicConstraints=critical,CA:TRUE',
            '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
}

my $serial = 1;

sub make_cert {
    my ($name, $ca, $cn, $san) = @_;
    $t->write_file("$name.ext", "basicConstraints=CA:FALSE\n"
        . "keyUsage=critical,digitalSignature\n"
        . "extendedKeyUsage=serverAuth\n"
        . "subjectAltName=$san\n");
    openssl('req', '-new', @EC, '-keyout', "$name.key", '-out', "$name.csr",
            '-subj', "/CN=$cn");
    openssl('x509', '-req', '-in', "$name.csr", '-CA', "$ca.crt",
            '-CAkey', "$ca.key", '-set_serial', ++$serial, '-days', 2,
            '-extfile', "$name.ext", '-out', "$name.crt");
}

make_ca('ca', 'ratepool test CA');
make_ca('rogue-ca', 'ratepool untrusted CA');

# nginx checks a name with X509_check_host(), DNS names only: the IP
# literal is a DNS SAN too, besides the IP SAN a browser would want
make_cert('good', 'ca', 'localhost',
          'DNS:localhost,DNS:127.0.0.1,IP:127.0.0.1');
# signed by the trusted CA, but for another name
make_cert('wrong', 'ca', 'wrong.example', 'DNS:wrong.example');
# the trusted CA, for localhost only: 127.0.0.1 does not verify against it
make_cert('localonly', 'ca', 'localhost', 'DNS:localhost');
# the right names, signed by a CA the gateway does not trust
make_cert('rogue', 'rogue-ca', 'localhost',
          'DNS:localhost,DNS:127.0.0.1,IP:127.0.0.1');

# --- the gateway, its TLS "providers" and the mock behind them ---------------

my @NAMES = qw(t_name t_ip k_name k2_name x_name x_ip m_good m_wrong
               m_rogue w_only r_only s_only fb_name fb_ip);
my %SECRET = map { $_ => 'sk-ant-mock-' . random_hex(16) } @NAMES;
my $TOKEN = 'gw-tls-' . random_hex(16);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { map { $SECRET{$_} => { org => "org-$_", name => $_ } } @NAMES },
});

$t->write_file("$_.key.secret", "$SECRET{$_}\n") for @NAMES;

sub key_line {
    my ($name, $server, $extra) = @_;
    return "ratepool_key $name org=org-$name server=$server "
         . "key_file=%%TESTDIR%%/$name.key.secret" . ($extra // '') . ';';
}

sub front {
    my ($port, $cert) = @_;
    return <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_$port%% ssl;
        ssl_certificate %%TESTDIR%%/$cert.crt;
        ssl_certificate_key %%TESTDIR%%/$cert.key;
        access_log %%TESTDIR%%/front-$cert.log front;

        location / {
            proxy_pass http://127.0.0.1:%%PORT_1%%;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Front $cert;
            proxy_set_header X-Seen-SNI "[\$ssl_server_name]";
            proxy_set_header X-Seen-Host "[\$http_host]";
            proxy_set_header X-Seen-TLS "[\$ssl_protocol]";
            proxy_set_header X-Seen-Conn "[\$connection_requests]";
            proxy_buffering off;
        }
    }
EOF
}

my $P2 = $t->port(2);

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format front '\$ssl_server_name "\$request" key=\$http_x_api_key';

    ratepool_zone llm:1m;

    upstream tls {
        ratepool zone=llm;
        ${\ key_line('t_name', 'localhost:%%PORT_2%%') }
        ${\ key_line('t_ip', '127.0.0.1:%%PORT_2%%') }
    }

    upstream sysca {
        ratepool zone=llm;
        ${\ key_line('s_only', 'localhost:%%PORT_2%%') }
    }

    upstream tlska {
        ratepool zone=llm;
        ${\ key_line('k_name', 'localhost:%%PORT_2%%') }
        ${\ key_line('k2_name', 'localhost:%%PORT_2%%') }
        keepalive 8;
    }

    upstream mixed {
        ratepool zone=llm;
        ${\ key_line('m_wrong', 'localhost:%%PORT_3%%') }
        ${\ key_line('m_rogue', 'localhost:%%PORT_4%%') }
        ${\ key_line('m_good', 'localhost:%%PORT_2%%') }
    }

    # a provider and, after it, another that speaks its API
    upstream providers {
        ratepool zone=llm;
        ${\ key_line('fb_name', 'localhost:%%PORT_2%%') }
        ${\ key_line('fb_ip', '127.0.0.1:%%PORT_2%%', ' fallback=1') }
    }

    upstream wrong {
        ratepool zone=llm;
        ${\ key_line('w_only', 'localhost:%%PORT_3%%') }
    }

    upstream rogue {
        ratepool zone=llm;
        ${\ key_line('r_only', 'localhost:%%PORT_4%%') }
    }

    ratepool_workspace backend;
    ratepool_client backend sha256:${\ sha256_hex($TOKEN) };

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass https://tls
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        # the system's CAs, which do not know this test's CA
        location /sysca/v1/ {
            rewrite ^/sysca(/.*)\$ \$1 break;
            ratepool_pass https://sysca;
        }

        location /ka/v1/ {
            rewrite ^/ka(/.*)\$ \$1 break;
            ratepool_pass https://tlska
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location /mixed/v1/ {
            rewrite ^/mixed(/.*)\$ \$1 break;
            ratepool_pass https://mixed
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location /fb/v1/ {
            rewrite ^/fb(/.*)\$ \$1 break;
            ratepool_pass https://providers
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location /wrong/v1/ {
            rewrite ^/wrong(/.*)\$ \$1 break;
            ratepool_pass https://wrong
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location /rogue/v1/ {
            rewrite ^/rogue(/.*)\$ \$1 break;
            ratepool_pass https://rogue
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }

${\ front(2, 'good') }
${\ front(3, 'wrong') }
${\ front(4, 'rogue') }
}
EOF

$t->run;

my %HOST = (localhost => "localhost:$P2", ip => "127.0.0.1:$P2");

sub keys_status {
    my $s = $t->status;
    return Ratepool::Test::by_name([ map { @{ $_->{keys} } }
                                     @{ $s->{pools} || [] } ]);
}

sub slurp { $t->read_file($_[0]) }

# what the TLS front saw for one request the mock logged
sub seen {
    my ($rec) = @_;
    my $h = $rec->{headers};
    my %s = (key => $rec->{key_name} // '?', front => $h->{'x-front'} // '');

    for my $what (qw(sni host tls conn)) {
        my ($v) = ($h->{"x-seen-$what"} // '') =~ /^\[(.*)\]$/;
        $s{$what} = $v // '(none)';
    }

    return \%s;
}

# checks every logged request against the key it was sent with: keys
# named *_name use server=localhost, keys named *_ip server=127.0.0.1
sub check_identity {
    my ($log, $what) = @_;
    my @bad;

    for my $s (map { seen($_) } @$log) {
        my ($want_sni, $want_host) =
            $s->{key} =~ /_name$|^m_good$/ ? ('localhost', $HOST{localhost})
          : $s->{key} =~ /_ip$/            ? ('', $HOST{ip})
          :                                  ('?', '?');
        push @bad, "key $s->{key}: front=$s->{front} SNI=[$s->{sni}] "
                 . "Host=[$s->{host}] TLS=[$s->{tls}]"
            unless $s->{front} eq 'good'
                && $s->{sni} eq $want_sni && $s->{host} eq $want_host
                && $s->{tls} =~ /^TLSv1\.[23]$/;
    }

    ok(!@bad, $what) or diag join "\n", @bad;
}

# --- every key goes out over verified TLS as its own host -------------------

my @r = map { $t->messages(token => $TOKEN) } 1 .. 6;
my $log = $mock->log;

is(join(',', map { $_->{status} } @r), join(',', (200) x 6),
    'requests through verified TLS upstreams are answered');
is(scalar @$log, 6, 'the provider saw each request once');
is_deeply([ sort map { $_->{key_name} } @$log ],
    [ sort +('t_ip') x 3, ('t_name') x 3 ],
    'spread over both keys');
check_identity($log,
    'each key\'s requests arrived over TLS with that key\'s host: '
    . 'SNI localhost and Host localhost:PORT for server=localhost, '
    . 'no SNI (an IP literal) and Host 127.0.0.1:PORT for server=127.0.0.1');
is(scalar(grep { ($_->{credential} // '') ne $SECRET{ $_->{key_name} } }
          @$log), 0, 'each under its own key\'s secret');
like(decode_json($r[0]{body})->{content}[0]{text}, qr/^Hello from t_/,
    'the provider\'s answer reaches the client');

# --- keepalive over TLS, as a real pool runs ------------------------------

# every key of the pool at one host, as all keys at api.anthropic.com:
# connections are reused across keys, and every request still goes out
# with the key's own host and secret

$mock->reset;
@r = map { $t->messages(token => $TOKEN, path => '/ka/v1/messages') } 1 .. 12;
$log = $mock->log;

is(join(',', map { $_->{status} } @r), join(',', (200) x 12),
    'requests through a keepalive pool over TLS are answered');
is_deeply([ sort map { $_->{key_name} } @$log ],
    [ sort +('k2_name') x 6, ('k_name') x 6 ], 'spread over both keys');
check_identity($log, 'each arrived with SNI and Host localhost');
is(scalar(grep { ($_->{credential} // '') ne $SECRET{ $_->{key_name} } }
          @$log), 0, 'each under its own key\'s secret');
cmp_ok(scalar(grep { seen($_)->{conn} > 1 } @$log), '>', 0,
    'over reused TLS connections');

# --- a 429 is re-routed over TLS to the other key, with the same body -------

$mock->reset;

my $body = { max_tokens => 21, messages => [
    { role => 'user', content => 'a prompt for TLS ' . random_hex(4) } ] };

# t_name answers 429 once; requests go out until one of them is first
# sent with t_name (the next or the one after, as keys take turns)
$mock->script($SECRET{t_name}, [ { status => 429, retry_after => '1' } ]);

my $r;
for (1 .. 4) {
    my $seen = @{ $mock->log };
    $r = $t->messages(token => $TOKEN, body => $body);
    $log = [ @{ $mock->log }[ $seen .. $#{ $mock->log } ] ];
    last if @$log && $log->[0]{key_name} eq 't_name';
}

is($r->{status}, 200, 'a 429 over TLS is hidden from the client');
is_deeply([ map { $_->{status} } @$log ], [ 429, 200 ],
    'the provider answered 429, then 200');
is_deeply([ map { $_->{key_name} } @$log ], [ 't_name', 't_ip' ],
    'first with t_name, then with t_ip');
is($log->[1]{body}, $log->[0]{body}, 'the same body went out again');
is($log->[1]{path}, $log->[0]{path}, 'to the same path');
check_identity($log, 'both tries arrived with their own key\'s SNI and Host');
like(decode_json($r->{body})->{content}[0]{text},
    qr/^Hello from \Q$log->[1]{key_name}\E$/,
    'the client gets the second key\'s answer');

# --- a 529 moves the request to the fallback provider's host --------------

$mock->reset;
$mock->script($SECRET{fb_name}, [ { status => 529 } ]);

$r = $t->messages(token => $TOKEN, body => $body,
                  path => '/fb/v1/messages');
$log = $mock->log;

is($r->{status}, 200, 'a 529 from the preferred provider over TLS is hidden');
is_deeply([ map { "$_->{key_name} $_->{status}" } @$log ],
    [ 'fb_name 529', 'fb_ip 200' ],
    'the request went on to the fallback provider');
check_identity($log, 'each provider was reached with its own host as SNI '
    . 'and Host, its certificate verified');
is(scalar(grep { ($_->{credential} // '') ne $SECRET{ $_->{key_name} } }
          @$log), 0, 'each under its own key\'s secret');

# --- a server that does not prove its identity gets no request --------------

$mock->reset;
@r = map { $t->messages(token => $TOKEN, path => '/mixed/v1/messages') }
     1 .. 6;
$log = $mock->log;
my $keys = keys_status();

is(join(',', map { $_->{status} } @r), join(',', (200) x 6),
    'a pool with unverifiable servers answers every request');
is_deeply([ map { $_->{key_name} } @$log ], [ ('m_good') x 6 ],
    'with the one key whose server verifies');
check_identity($log, 'over TLS to the verified front');
cmp_ok($keys->{m_wrong}{responses}{failed}, '>=', 1,
    'the key whose certificate names another host was tried and failed');
cmp_ok($keys->{m_rogue}{responses}{failed}, '>=', 1,
    'so was the key whose certificate comes from an untrusted CA');

like($t->error_log,
    qr/upstream SSL certificate does not match "localhost"/,
    'the error log says the certificate does not match the key\'s host');
like($t->error_log, qr/upstream SSL certificate verify error: \(\d+:/,
    'and that the untrusted one did not verify');

# pools with nothing but an unverifiable server

$mock->reset;
$r = $t->messages(token => $TOKEN, path => '/wrong/v1/messages');
is($r->{status}, 502, 'a pool whose only server does not match fails, 502');

$r = $t->messages(token => $TOKEN, path => '/rogue/v1/messages');
is($r->{status}, 502, 'so does one whose only server is untrusted');
is(scalar @{ $mock->log }, 0, 'neither request reached the provider');

$keys = keys_status();
is($keys->{w_only}{responses}{failed}, 1, 'each counts its failed try');
is($keys->{r_only}{responses}{failed}, 1, 'both of them');

# the unverified servers never saw a request, let alone a credential

is(slurp('front-wrong.log'), '',
    'the server with the wrong name got no request');
is(slurp('front-rogue.log'), '',
    'the server with the untrusted certificate got no request');

# everything the mock ever logged (its file outlives resets) and every log
my $everything = join '', map { slurp($_) }
    qw(mock0.jsonl front-good.log front-wrong.log front-rogue.log
       error.log access.log);
for my $name (qw(m_wrong m_rogue w_only r_only)) {
    unlike($everything, qr/\Q$SECRET{$name}\E/,
           "the secret of $name was sent nowhere");
}
like($everything, qr/\Q$SECRET{m_good}\E/,
    'while the good key\'s secret did reach the provider, so the scan sees '
    . 'what was sent');

# --- verification is the default ----------------------------------------------

$mock->reset;
$r = $t->messages(token => $TOKEN, path => '/sysca/v1/messages');

is($r->{status}, 502, 'with the system CAs the test CA\'s servers are refused');
like($r->{headers}{'content-type'}, qr{^application/json},
    'with a JSON error');
is(scalar @{ $mock->log }, 0, 'and no key was sent to them');

# --- nothing is left held ---------------------------------------------------

my $s = $t->status;
is($s->{totals}{in_flight}, 0, 'no request is left in flight');

$t->stop;
$t->check_log;

# --- keepalive over keys of two hosts at one address ------------------------

# nginx's keepalive cache matches connections by address alone.  Here
# x_name (localhost) and x_ip (127.0.0.1) reach one address whose
# certificate names localhost only: x_ip's server does not verify as
# 127.0.0.1, so x_ip must never send a request, not even over a
# connection made and verified for x_name: nginx -t refuses such a pool.

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format front '\$ssl_server_name "\$request" key=\$http_x_api_key';

    ratepool_zone llm:1m;

    upstream kamix {
        ratepool zone=llm;
        ${\ key_line('x_name', 'localhost:%%PORT_5%%') }
        ${\ key_line('x_ip', '127.0.0.1:%%PORT_5%%') }
        keepalive 8;
    }

    ratepool_workspace backend;
    ratepool_client backend sha256:${\ sha256_hex($TOKEN) };

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass https://kamix
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }
    }

${\ front(5, 'localonly') }
}
EOF

my ($rc, $out) = $t->nginx_test_config;

isnt($rc, 0, 'keepalive over keys of two hosts at one address is refused');
like($out, qr/keys "x_name" and "x_ip" .*keepalive/,
    'naming the keys and the reason');

done_testing;
