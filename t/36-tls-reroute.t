#!/usr/bin/perl

# Re-routing over TLS: a 429 from the provider goes to the pool's other
# key with the same body and path, a 529 goes on to the fallback
# provider, and each try goes out with its own key's host as SNI and
# Host, its certificate verified, under its own key's secret; the client
# sees only the answer that succeeded.  The providers are TLS fronts in
# the same nginx (see Ratepool::Tls).

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use JSON::PP;
use Test::More;

use Ratepool::Test;
use Ratepool::Tls;

my $t = Ratepool::Test->new;
my $tls = Ratepool::Tls->new($t, keys => [ qw(t_name t_ip fb_name fb_ip) ]);
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

    # a provider and, after it, another that speaks its API
    upstream providers {
        ratepool zone=llm;
        ${\ $tls->key_line('fb_name', 'localhost:%%PORT_2%%') }
        ${\ $tls->key_line('fb_ip', '127.0.0.1:%%PORT_2%%', ' fallback=1') }
    }

    ratepool_workspace backend;
    ratepool_client backend sha256:${\ sha256_hex($TOKEN) };

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass https://tls
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location /fb/v1/ {
            rewrite ^/fb(/.*)\$ \$1 break;
            ratepool_pass https://providers
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

# --- a 429 is re-routed over TLS to the other key, with the same body -------

my $body = { max_tokens => 21, messages => [
    { role => 'user', content => 'a prompt for TLS '
                                 . Ratepool::Test::random_hex(4) } ] };

# t_name answers 429 once; requests go out until one of them is first
# sent with t_name (the next or the one after, as keys take turns)
$mock->script($tls->secret('t_name'), [ { status => 429, retry_after => '1' } ]);

my ($r, $log);
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
$tls->check_identity($log,
    'both tries arrived with their own key\'s SNI and Host');
like(decode_json($r->{body})->{content}[0]{text},
    qr/^Hello from \Q$log->[1]{key_name}\E$/,
    'the client gets the second key\'s answer');

# --- a 529 moves the request to the fallback provider's host --------------

$mock->reset;
$mock->script($tls->secret('fb_name'), [ { status => 529 } ]);

$r = $t->messages(token => $TOKEN, body => $body,
                  path => '/fb/v1/messages');
$log = $mock->log;

is($r->{status}, 200, 'a 529 from the preferred provider over TLS is hidden');
is_deeply([ map { "$_->{key_name} $_->{status}" } @$log ],
    [ 'fb_name 529', 'fb_ip 200' ],
    'the request went on to the fallback provider');
$tls->check_identity($log, 'each provider was reached with its own host as '
    . 'SNI and Host, its certificate verified');
is($tls->wrong_secrets($log), 0, 'each under its own key\'s secret');

# --- nothing is left held ---------------------------------------------------

is($t->status->{totals}{in_flight}, 0, 'no request is left in flight');

$t->stop;
$t->check_log;

done_testing;
