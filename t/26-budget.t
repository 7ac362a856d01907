#!/usr/bin/perl

# Daily and monthly token budgets per workspace, counted from the usage
# the provider reports: a workspace past its budget is told so the way a
# provider tells of a spend cap, with the moment the budget resets and no
# retry-after, so that clients stop instead of retrying.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use POSIX qw(strftime);
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-ant-mock-b1-' . Ratepool::Test::random_hex(8);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(daily monthly free);

my $mock = $t->start_mock(port => 1);

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_key b1 server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_workspace daily daily_tokens=1000;
    ratepool_workspace monthly rpm=100 monthly_tokens=5000;
    ratepool_workspace free;
    ratepool_client daily ${\ $t->token_hash($TOKEN{daily})};
    ratepool_client monthly ${\ $t->token_hash($TOKEN{monthly})};
    ratepool_client free ${\ $t->token_hash($TOKEN{free})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

# every answer reports 600 tokens: 250 in, 100 read from and 50 written
# to the cache, 200 out
my @usage = ('x-mock-usage' => encode_json({
    input_tokens => 250, cache_read_input_tokens => 100,
    cache_creation_input_tokens => 50, output_tokens => 200 }));

sub ask { $t->messages(token => $TOKEN{ $_[0] }, headers => \@usage) }

is(ask('daily')->{status}, 200, 'a workspace within its daily budget');
is(ask('daily')->{status}, 200, 'still within it at 600 of 1000 tokens');

my $seen = @{ $mock->log };
my $r = ask('daily');
my $err = eval { decode_json($r->{body}) } || {};
my $tomorrow = strftime('%Y-%m-%dT00:00:00Z', gmtime(time + 86400));

is($r->{status}, 429, 'past its daily budget it gets 429');
is($err->{error}{type}, 'rate_limit_error', 'a rate_limit_error');
like($err->{error}{message},
    qr/workspace "daily" has used its daily budget of 1000 tokens; it resets at \Q$tomorrow\E/,
    'naming the budget and when it resets');
is($err->{error}{details}{error_code}, 'enforced_spend_limit_reached',
    'coded as a spend cap, which clients do not retry');
is($r->{headers}{'retry-after'}, undef, 'with no retry-after');
is($r->{headers}{'x-should-retry'}, 'false', 'and x-should-retry: false');
is(scalar @{ $mock->log }, $seen, 'the provider was not asked');

is(ask('free')->{status}, 200, 'another workspace is not affected');

# monthly

is(ask('monthly')->{status}, 200, "request $_ within a monthly budget")
    for 1 .. 9;

$r = ask('monthly');
$err = eval { decode_json($r->{body}) } || {};
my @now = gmtime;
my $next_month = sprintf '%04d-%02d-01T00:00:00Z',
    $now[4] == 11 ? ($now[5] + 1901, 1) : ($now[5] + 1900, $now[4] + 2);

is($r->{status}, 429, 'past its monthly budget of 5000 tokens it gets 429');
like($err->{error}{message},
    qr/workspace "monthly" has used its monthly budget of 5000 tokens; it resets at \Q$next_month\E/,
    'naming the monthly budget and the first of next month');

# the status

my $ws = Ratepool::Test::by_name($t->status->{workspaces});

is($ws->{daily}{tokens_today}, 1200, 'the status shows the tokens of today');
is($ws->{daily}{daily_tokens}, 1000, 'and the daily budget');
is($ws->{monthly}{tokens_this_month}, 5400,
    'and the tokens of this month');
is($ws->{daily}{rejected}, 1, 'and the request refused for the budget');

# a spent budget and a body that cannot be read: an answer, not a hang

{
    use IO::Socket::INET;

    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                                  PeerPort => $t->port(0), Timeout => 5)
        or die "connect: $@";
    print $s "POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
        . "x-api-key: $TOKEN{daily}\r\nTransfer-Encoding: chunked\r\n"
        . "Connection: close\r\n\r\nzz\r\n";

    my $answer = '';
    my $sel = IO::Select->new($s);
    while ($sel->can_read(3)) {
        last unless sysread($s, my $buf, 4096);
        $answer .= $buf;
    }

    like($answer, qr{^HTTP/1\.1 4\d\d },
         'a spent workspace sending a broken chunked body gets an answer');
}

$t->stop;
$t->check_log;

done_testing;
