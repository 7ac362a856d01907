#!/usr/bin/perl

# The provider's certificate is always verified: a key whose server does
# not prove its identity (a certificate for another name, or from a CA
# the gateway does not trust) is tried, fails and never gets a request,
# so its secret and the client's prompt never reach that server; a pool
# of nothing else answers 502; without ssl_trusted_certificate= the
# system's CAs are the ones trusted.  The providers are TLS fronts in the
# same nginx (see Ratepool::Tls).

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use Test::More;

use Ratepool::Test;
use Ratepool::Tls;

my $t = Ratepool::Test->new;
my $tls = Ratepool::Tls->new($t,
    keys => [ qw(m_good m_wrong m_rogue w_only r_only s_only) ]);
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

    upstream sysca {
        ratepool zone=llm;
        ${\ $tls->key_line('s_only', 'localhost:%%PORT_2%%') }
    }

    upstream mixed {
        ratepool zone=llm;
        ${\ $tls->key_line('m_wrong', 'localhost:%%PORT_3%%') }
        ${\ $tls->key_line('m_rogue', 'localhost:%%PORT_4%%') }
        ${\ $tls->key_line('m_good', 'localhost:%%PORT_2%%') }
    }

    upstream wrong {
        ratepool zone=llm;
        ${\ $tls->key_line('w_only', 'localhost:%%PORT_3%%') }
    }

    upstream rogue {
        ratepool zone=llm;
        ${\ $tls->key_line('r_only', 'localhost:%%PORT_4%%') }
    }

    ratepool_workspace backend;
    ratepool_client backend sha256:${\ sha256_hex($TOKEN) };

    server {
        listen 127.0.0.1:%%PORT_0%%;

        # the system's CAs, which do not know this test's CA
        location /sysca/v1/ {
            rewrite ^/sysca(/.*)\$ \$1 break;
            ratepool_pass https://sysca;
        }

        location /mixed/v1/ {
            rewrite ^/mixed(/.*)\$ \$1 break;
            ratepool_pass https://mixed
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

${\ $tls->front(2, 'good') }
${\ $tls->front(3, 'wrong') }
${\ $tls->front(4, 'rogue') }
}
EOF

$t->run;

sub keys_status {
    my $s = $t->status;
    return Ratepool::Test::by_name([ map { @{ $_->{keys} } }
                                     @{ $s->{pools} || [] } ]);
}

sub slurp { $t->read_file($_[0]) }

# --- a server that does not prove its identity gets no request --------------

my @r = map { $t->messages(token => $TOKEN, path => '/mixed/v1/messages') }
        1 .. 6;
my $log = $mock->log;
my $keys = keys_status();

is(join(',', map { $_->{status} } @r), join(',', (200) x 6),
    'a pool with unverifiable servers answers every request');
is_deeply([ map { $_->{key_name} } @$log ], [ ('m_good') x 6 ],
    'with the one key whose server verifies');
$tls->check_identity($log, 'over TLS to the verified front');
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
my $r = $t->messages(token => $TOKEN, path => '/wrong/v1/messages');
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
    my $secret = $tls->secret($name);
    unlike($everything, qr/\Q$secret\E/,
           "the secret of $name was sent nowhere");
}
my $good = $tls->secret('m_good');
like($everything, qr/\Q$good\E/,
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

is($t->status->{totals}{in_flight}, 0, 'no request is left in flight');

$t->stop;
$t->check_log;

done_testing;
