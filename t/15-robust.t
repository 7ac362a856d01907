#!/usr/bin/perl

# The edges of ordinary nginx use: stale keepalive connections, "if"
# blocks, error_page redirects to another pool, and nginx's own errors,
# which reach clients in the provider's format.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(s1 m1 f1);
my $TOKEN = 'gw-robust-' . Ratepool::Test::random_hex(8);

# the stale mock closes every connection nginx reuses, unanswered
my $stale = $t->start_mock(port => 1, config => {
    keys => { $KEY{s1} => { org => 'org-s', name => 's1' } },
    close_reused => JSON::PP::true,
});

my $mock = $t->start_mock(port => 2, config => {
    keys => {
        $KEY{m1} => { org => 'org-m', name => 'm1' },
        $KEY{f1} => { org => 'org-f', name => 'f1' },
    },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream stale {
        ratepool zone=llm;
        ratepool_key s1 org=org-s server=127.0.0.1:%%PORT_1%% key=$KEY{s1};
        keepalive 4;
    }

    upstream main {
        ratepool zone=llm;
        ratepool_key m1 org=org-m server=127.0.0.1:%%PORT_2%% key=$KEY{m1};
    }

    upstream fallback {
        ratepool zone=llm;
        ratepool_key f1 org=org-f server=127.0.0.1:%%PORT_2%% key=$KEY{f1};
    }

    upstream down {
        ratepool zone=llm;
        ratepool_key d1 org=org-d server=127.0.0.1:%%PORT_3%% key=sk-down;
    }

    ratepool_workspace backend;
    ratepool_client backend ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /stale/v1/ {
            rewrite ^/stale(/.*)\$ \$1 break;
            ratepool_pass http://stale;
        }

        location /if/v1/ {
            if (\$http_x_test = "if") {
                add_header x-went-through-if yes;
                rewrite ^/if(/.*)\$ \$1 break;
            }

            rewrite ^/if(/.*)\$ \$1 break;
            ratepool_pass http://main;
        }

        # 429 from the main pool goes to the fallback pool
        location /main/v1/ {
            rewrite ^/main(/.*)\$ \$1 break;
            ratepool_pass http://main;
            proxy_intercept_errors on;
            error_page 429 = \@fallback;
        }

        location \@fallback {
            ratepool_pass http://fallback;
        }

        location /small/v1/ {
            rewrite ^/small(/.*)\$ \$1 break;
            client_max_body_size 100;
            ratepool_pass http://main;
        }

        location /down/v1/ {
            rewrite ^/down(/.*)\$ \$1 break;
            ratepool_pass http://down;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub error_of { eval { decode_json($_[0]{body}) } || {} }

# a keepalive connection the provider had closed: the same key again

my @got = map {
    $t->messages(token => $TOKEN, path => '/stale/v1/messages')->{status}
} 1 .. 6;

is(join(',', @got), '200,200,200,200,200,200',
    'requests on connections the provider closed are sent again');

my $s1 = Ratepool::Test::by_name($t->status->{pools}[0]{keys})->{s1};
is($s1->{responses}{failed}, 0, 'a stale connection is not a key failure');
is($s1->{state}, 'ok', 'and the key stays in rotation');

# an "if" block inside a ratepool_pass location

my $r = $t->messages(token => $TOKEN, path => '/if/v1/messages',
                     headers => [ 'x-test' => 'if' ]);

is($r->{status}, 200, 'a request through an "if" block reaches the pool');
is($r->{headers}{'x-went-through-if'}, 'yes', 'and went through the block');
is($t->messages(path => '/if/v1/messages',
                headers => [ 'x-test' => 'if' ])->{status}, 401,
    'and is authenticated there too');

# error_page to another pool: counted once, served by the other pool

$mock->reset;
$mock->script($KEY{m1}, [ { status => 429, retry_after => '20' } ]);

my $before = $t->status;
$r = $t->messages(token => $TOKEN, path => '/main/v1/messages');
my $after = $t->status;

is($r->{status}, 200, 'a 429 of the main pool is answered by the fallback');
is_deeply([ map { $_->{key_name} } @{ $mock->log } ], [ 'm1', 'f1' ],
    'the request went to m1, then to f1');
is($after->{totals}{requests} - $before->{totals}{requests}, 1,
    'it is counted as one request');
is($after->{workspaces}[0]{admitted} - $before->{workspaces}[0]{admitted}, 1,
    'the workspace is charged once');
is($after->{totals}{in_flight}, 0, 'nothing is left in flight');

# nginx's own errors in the provider's format

$r = $t->messages(token => $TOKEN, path => '/small/v1/messages',
                  body => 'x' x 1000);

is($r->{status}, 413, 'a body over client_max_body_size gets 413');
like($r->{headers}{'content-type'}, qr{^application/json}, 'in JSON');
is(error_of($r)->{error}{type}, 'request_too_large',
    'as the provider\'s request_too_large');

$r = $t->messages(token => $TOKEN, path => '/down/v1/messages');

is($r->{status}, 502, 'a pool whose only server is down gets 502');
is(error_of($r)->{error}{type}, 'api_error', 'as an api_error');
like(error_of($r)->{request_id}, qr/^req_gw_/, 'from the gateway');
is($r->{headers}{'x-should-retry'}, 'true', 'which the client may retry');
unlike($r->{body}, qr/<html>/, 'not nginx\'s HTML page');

$r = $t->http(port => $t->port(0), path => '/v2/unknown');
is($r->{status}, 404, 'paths outside the pools are nginx\'s as usual');

$t->stop;
$t->check_log;

done_testing;
