#!/usr/bin/perl

# TLS to the provider, each key as its own host: with "ratepool_pass
# https://pool" every key's requests go out over TLS with that key's host
# as SNI and Host and under that key's secret, the provider's certificate
# verified (against ssl_trusted_certificate=), also when the pool's
# keepalive connections are reused across keys at one host.  A keepalive
# pool of keys of two hosts at one address, where that cannot hold, is
# refused by nginx -t.  The providers are TLS fronts in the same nginx
# (see Ratepool::Tls).

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use JSON::PP;
use Test::More;

use Ratepool::Test;
use Ratepool::Tls;

my $t = Ratepool::Test->new;
my $tls = Ratepool::Tls->new($t,
    keys => [ qw(t_name t_ip k_name k2_name x_name x_ip) ]);
my $mock = $tls->mock;
my $TOKEN = 'gw-tls-' . Ratepool::Test::random_hex(16);

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ${\ $tls->log_format }

    ratepool_zone llm:1m;

    upstream tls {
        ratepool zone=llm;
        ${\ $tls->key_line('t_name', 'localhost:%%PORT_2%%') }
        ${\ $tls->key_line('t_ip', '127.0.0.1:%%PORT_2%%') }
    }

    upstream tlska {
        ratepool zone=llm;
        ${\ $tls->key_line('k_name', 'localhost:%%PORT_2%%') }
        ${\ $tls->key_line('k2_name', 'localhost:%%PORT_2%%') }
        keepalive 8;
    }

    ratepool_workspace backend;
    ratepool_client backend sha256:${\ sha256_hex($TOKEN) };

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass https://tls
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location /ka/v1/ {
            rewrite ^/ka(/.*)\$ \$1 break;
            ratepool_pass https://tlska
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }

${\ $tls->front(2, 'good') }
}
EOF

$t->run;

# --- every key goes out over verified TLS as its own host -------------------

my @r = map { $t->messages(token => $TOKEN) } 1 .. 6;
my $log = $mock->log;

is(join(',', map { $_->{status} } @r), join(',', (200) x 6),
    'requests through verified TLS upstreams are answered');
is(scalar @$log, 6, 'the provider saw each request once');
is_deeply([ sort map { $_->{key_name} } @$log ],
    [ sort +('t_ip') x 3, ('t_name') x 3 ],
    'spread over both keys');
$tls->check_identity($log,
    'each key\'s requests arrived over TLS with that key\'s host: '
    . 'SNI localhost and Host localhost:PORT for server=localhost, '
    . 'no SNI (an IP literal) and Host 127.0.0.1:PORT for server=127.0.0.1');
is($tls->wrong_secrets($log), 0, 'each under its own key\'s secret');
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
my %by_key;
$by_key{ $_->{key_name} }++ for @$log;
ok(($by_key{k_name} // 0) >= 3 && ($by_key{k2_name} // 0) >= 3
   && keys %by_key == 2, 'spread over both keys')
    or diag explain \%by_key;
$tls->check_identity($log, 'each arrived with SNI and Host localhost');
is($tls->wrong_secrets($log), 0, 'each under its own key\'s secret');
cmp_ok(scalar(grep { Ratepool::Tls::seen($_)->{conn} > 1 } @$log), '>', 0,
    'over reused TLS connections');

# --- nothing is left held ---------------------------------------------------

is($t->status->{totals}{in_flight}, 0, 'no request is left in flight');

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

    ${\ $tls->log_format }

    ratepool_zone llm:1m;

    upstream kamix {
        ratepool zone=llm;
        ${\ $tls->key_line('x_name', 'localhost:%%PORT_5%%') }
        ${\ $tls->key_line('x_ip', '127.0.0.1:%%PORT_5%%') }
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

${\ $tls->front(5, 'localonly') }
}
EOF

my ($rc, $out) = $t->nginx_test_config;

isnt($rc, 0, 'keepalive over keys of two hosts at one address is refused');
like($out, qr/keys "x_name" and "x_ip" .*keepalive/,
    'naming the keys and the reason');

done_testing;
