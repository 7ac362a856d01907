#!/usr/bin/perl

# A large request is not starved by small ones: with ratepool_wait, a
# waiting request whose turn it is holds what it needs on the org where
# it fits first, so that requests that come later (a batch workspace's
# small ones, which fit the moment there is room for them) fit only
# beside it, and it is served once its org has refilled that much,
# instead of waiting until its time is over while every small request
# goes.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-ant-mock-l1-' . Ratepool::Test::random_hex(8);
my $KEY2 = 'sk-ant-mock-m1-' . Ratepool::Test::random_hex(8);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(batch turn other);

# 6,000 input tokens a minute: 100 a second
my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { $KEY => { org => 'org-l', name => 'l1' },
              $KEY2 => { org => 'org-m', name => 'm1' } },
    orgs => { 'org-l' => { rpm => 100000, itpm => 6000, otpm => 1000000 },
              'org-m' => { rpm => 100000, itpm => 6000, otpm => 1000000 } },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format waits '\$ratepool_workspace \$status \$ratepool_wait_ms';
    access_log %%TESTDIR%%/waits.log waits;

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-l rpm=100000 itpm=6000 otpm=1000000;
        ratepool_key l1 org=org-l server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    upstream two {
        ratepool zone=llm;
        ratepool_org org-m rpm=100000 itpm=6000 otpm=1000000;
        ratepool_key m1 org=org-m server=127.0.0.1:%%PORT_1%% key=$KEY2;
    }

    ratepool_workspace batch;
    ratepool_workspace turn;
    ratepool_workspace other;
    ratepool_client batch ${\ $t->token_hash($TOKEN{batch})};
    ratepool_client turn ${\ $t->token_hash($TOKEN{turn})};
    ratepool_client other ${\ $t->token_hash($TOKEN{other})};

    ratepool_wait 10s;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location /two/v1/ {
            rewrite ^/two(/.*)\$ \$1 break;
            ratepool_pass http://two;
            ratepool_wait 20s;
        }

        location = /ratepool/status {
            access_log off;
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub ask {
    my ($who, $bytes, $path) = @_;
    return $t->messages(token => $TOKEN{$who}, timeout => 30,
                        path => $path // '/v1/messages', body => {
        max_tokens => 16,
        messages => [ { role => 'user', content => 'x' x $bytes } ] });
}

# the batch: one client sending requests of about 100 tokens, as fast as
# they are answered for 3 s, which uses up the minute's worth of room the
# org starts with, then from 4.5 s at half of what the org refills (one
# every 2 s), each finding room the moment it comes; a turn of about 600
# tokens comes at 3.5 s.  Without a hold on the org, the turn would find
# it refilled by only 50 tokens a second, too slow for its wait of 10 s.

my $start = time;
my $results = $t->parallel(2, sub {
    my ($i) = @_;

    if ($i == 1) {
        sleep 3.5;
        my $t0 = time;
        my $r = ask('turn', 2300);
        return [ 'turn', $r->{status}, time - $t0 ];
    }

    my ($served, $refused) = (0, 0);
    my $next = $start + 4.5;
    while (time < $start + 13) {
        if (time > $start + 3) {
            sleep($next - time) if $next > time;
            $next += 2;
        }
        my $r = ask('batch', 300);
        $r->{status} == 200 ? $served++ : $refused++;
    }
    return [ 'batch', $served, $refused ];
});

my ($turn) = grep { $_->[0] eq "turn" } @$results;
my @batch = grep { $_->[0] eq 'batch' } @$results;
my $served = 0;
$served += $_->[1] for @batch;

is($turn->[1], 200, 'the large request is served, not refused');
ok($turn->[2] < 8.5, 'within about the time its org takes to refill for '
   . 'it (6 s), not its whole wait of 10 s')
    or diag "it took $turn->[2] s";
cmp_ok($served, '>=', 60 + 4, 'the small ones go on beside it')
    or diag explain $results;
is($batch[0][2], 0, 'none of them refused');

my @upstream_429 = grep { $_->{status} == 429 } @{ $mock->log };
is(scalar @upstream_429, 0, 'and the provider refused none of them');

my $status = $t->status;
is($status->{pools}[0]{orgs}[0]{reserved_input_tokens}, 0,
   'nothing is held for anyone once all is done');

# two large requests of two workspaces, at once, on a used-up org: one
# holds the org and is served once it has room for it, then the other;
# neither holds it against the other until there is room for both

$start = time;
$results = $t->parallel(3, sub {
    my ($i) = @_;

    if ($i >= 1) {
        sleep 3.5;
        my $t0 = time;
        my $r = ask($i == 1 ? 'turn' : 'other', 2300, '/two/v1/messages');
        return [ $r->{status}, time - $t0 ];
    }

    ask('batch', 300, '/two/v1/messages') while time < $start + 3;
    return [ 0, 0 ];
});

my @large = sort { $a->[1] <=> $b->[1] } @$results[1, 2];
is_deeply([ map { $_->[0] } @large ], [ 200, 200 ], 'both are served');
ok($large[0][1] < 9, 'the first once the org has room for it (6 s)')
    or diag "after $large[0][1] and $large[1][1] s";

$t->check_log;

done_testing;
