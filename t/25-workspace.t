#!/usr/bin/perl

# Workspace budgets: each workspace's requests per minute are a token
# bucket of its own, refilling continuously, answered with its own 429.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-ant-mock-w1-' . int(rand(1e9));
my %TOKEN = map { $_ => "gw-$_-" . int(rand(1e9)) } qw(ci backend);

my $mock = $t->start_mock(port => 1);

$t->write_config(<<"EOF2");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_key w1 server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_client ci ${\ $t->token_hash($TOKEN{ci})};
    ratepool_workspace ci rpm=3;
    ratepool_workspace backend rpm=120;
    ratepool_client backend ${\ $t->token_hash($TOKEN{backend})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /status {
            ratepool_status;
        }
    }
}
EOF2

$t->run;

my @got = map { $t->messages(token => $TOKEN{ci})->{status} } 1 .. 3;
is(join(',', @got), '200,200,200', 'a workspace of 3 rpm gets 3 at once');

my $r = $t->messages(token => $TOKEN{ci});
my $err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 429, 'the fourth is over the workspace budget');
is($err->{error}{type}, 'rate_limit_error', 'as a rate_limit_error');
like($err->{error}{message}, qr/workspace "ci" .* 3 requests per minute/,
    'naming the workspace and its budget');
ok($r->{headers}{'retry-after'} >= 20 && $r->{headers}{'retry-after'} <= 23,
    'retry-after is the refill time of one request (20 s at 3 rpm)');
is($r->{headers}{'x-should-retry'}, 'true', 'x-should-retry is true');
is(scalar @{ $mock->log }, 3, 'the refused request never reached the provider');

is($t->messages(token => $TOKEN{backend})->{status}, 200,
    'another workspace is not affected');

my $s = decode_json($t->http(port => $t->port(0), path => '/status')->{body});
my ($ci) = grep { $_->{name} eq 'ci' } @{ $s->{workspaces} };

is($ci->{admitted}, 3, 'the status counts the admitted requests');
is($ci->{rejected}, 1, 'and the rejected one');
is($ci->{rpm_available}, 0, 'and shows the bucket empty');

# a continuous bucket: at 120 rpm one request comes back every 500 ms,
# not a whole minute's worth at the top of the minute

sub until_refused {
    my ($n, $t0) = (0, time);
    $n++ while $n < 400
               && $t->messages(token => $TOKEN{backend})->{status} == 200;
    return ($n, time - $t0);
}

my ($n, $took) = until_refused();
ok($n >= 118 && $n <= 119 + 2 * $took + 1,
   'a workspace of 120 rpm runs dry after its burst')
    or diag "$n requests in $took s";

my $t0 = time;
sleep 1.05;
($n, $took) = until_refused();
my $refilled = 2 * (time - $t0);
ok($n >= $refilled - 1 && $n <= $refilled + 1,
   'after a pause, requests fit at two a second, no more')
    or diag "$n requests after ${\ (time - $t0)} s";

$t->stop;
$t->check_log;

done_testing;
